import pytest
import yaml

from homepage.config import ConfigError, load_config
from homepage.world import WorldConfig


def test_yaml_and_nested_overrides(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"n_users": 50, "logging_policy": {"max_rows": 5}}))
    cfg = load_config(WorldConfig, path, ["n_entities=80", "logging_policy.min_rows=3", "rewards.binge=5.5"])
    assert (cfg.n_users, cfg.n_entities, cfg.logging_policy.max_rows, cfg.logging_policy.min_rows) == (50, 80, 5, 3)
    assert cfg.rewards.binge == 5.5


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_user'\].*n_users"):
        load_config(WorldConfig, None, ["n_user=5"])


def test_wrong_type_and_invalid_value_say_what_to_change():
    with pytest.raises(ConfigError, match="n_users: expected an integer, got 'many'"):
        load_config(WorldConfig, None, ["n_users=many"])
    with pytest.raises(ConfigError, match="binge > long_play"):
        load_config(WorldConfig, None, ["rewards.short_play=9"])
