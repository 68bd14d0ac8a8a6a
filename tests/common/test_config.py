"""The typed config loader: YAML and dotlist overrides on OmegaConf, Literal choices, tuples, errors that say
what to change."""

import dataclasses
import typing
from typing import Literal

import pytest
import yaml

from common.config import ConfigError, config_fields, config_help, from_dict, load_config, option, to_dict
from homepage.config import WorldConfig
from policies.config import PretrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = option(3, "an inner size")


@dataclasses.dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = option("a", "which mode")
    seeds: tuple[int, ...] = option((0, 1), "seeds")
    limit: int | None = option(None, "an optional limit")
    inner: Inner = option(factory=Inner, help="a nested section")
    maybe: Inner | None = option(None, "an optional nested section")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")


def test_yaml_and_nested_overrides(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"n_users": 50, "logging_policy": {"max_rows": 5}}))
    cfg = load_config(WorldConfig, path, ["n_entities=80", "logging_policy.min_rows=3", "rewards.binge=5.5"])
    assert (cfg.n_users, cfg.n_entities, cfg.logging_policy.max_rows, cfg.logging_policy.min_rows) == (50, 80, 5, 3)
    assert cfg.rewards.binge == 5.5 and cfg.logging_policy.temperature == 0.6  # untouched: the default


def test_unknown_key_lists_the_known_keys_of_its_section():
    with pytest.raises(ConfigError, match=r"unknown key 'n_user'; known keys: .*n_users"):
        load_config(WorldConfig, None, ["n_user=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden'; known keys of ModelSize: hidden_size"):
        load_config(PretrainConfig, None, ["model.hiden=3"])


def test_wrong_type_and_invalid_value_say_what_to_change():
    with pytest.raises(ConfigError, match="n_users: expected int, got 'many'"):
        load_config(WorldConfig, None, ["n_users=many"])
    with pytest.raises(ConfigError, match="binge > long_play"):
        load_config(WorldConfig, None, ["rewards.short_play=9"])
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        load_config(Outer, None, ["limit=-1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Outer, None, ["limit"])


def test_literal_choices_are_checked_and_listed():
    assert load_config(Outer, None, ["mode=b"]).mode == "b"
    with pytest.raises(ConfigError, match=r"mode: 'c' is not one of 'a', 'b'"):
        load_config(Outer, None, ["mode=c"])
    with pytest.raises(ConfigError, match=r"rules.modes.dedup: 'soft' is not one of 'mask', 'reward', 'off'"):
        load_config(PretrainConfig, None, ["rules.modes.dedup=soft"])


def test_tuples_optionals_and_optional_sections():
    cfg = load_config(Outer, None, ["seeds=[4,5,6]", "limit=7", "maybe.size=9"])
    assert cfg.seeds == (4, 5, 6) and isinstance(cfg.seeds, tuple)  # OmegaConf hands back a list
    assert cfg.limit == 7 and cfg.maybe == Inner(9) and cfg.inner == Inner(3)
    assert load_config(Outer).maybe is None
    assert load_config(Outer, None, ["limit=null"]).limit is None


def test_round_trip_through_a_saved_dict():
    cfg = load_config(PretrainConfig, None, ["rules.pinned_rows={trending_now: 0}", "steps=7"])
    again = from_dict(PretrainConfig, to_dict(cfg))
    assert again == cfg and again.rules.pinned_rows == {"trending_now": 0}


def test_help_lists_every_field_with_type_default_and_help():
    text = config_help(Outer)
    # the rows: dotted name, (type, default), then the help on the next line
    assert "  mode  ('a' | 'b', default 'a')\n      which mode" in text
    assert "  seeds  (list[int], default [0, 1])" in text
    assert "  inner  (Inner)\n      a nested section" in text
    assert "  inner.size  (int, default 3)\n      an inner size" in text
    assert "  limit  (int | None, default None)" in text
    assert [name for name, *_ in config_fields(Outer)] == ["mode", "seeds", "limit", "inner", "inner.size", "maybe",
                                                           "maybe.size"]


def test_a_field_without_help_is_refused():
    with pytest.raises(TypeError, match="needs help"):
        option(3)


def test_choices_are_typed():
    hints = typing.get_type_hints(PretrainConfig)
    assert typing.get_args(hints["eval_backend"]) == ("vllm", "hf")
    assert typing.get_args(hints["wandb_mode"]) == ("offline", "online", "disabled")
