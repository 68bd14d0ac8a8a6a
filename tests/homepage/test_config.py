from pathlib import Path

import pytest
import yaml

from homepage.config import ConfigError, load_config
from homepage.world import MakeWorldConfig, WorldConfig

ROOT = Path(__file__).parents[2]


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


# Every YAML under recipes/configs/ and the typed config it must load into (add new recipes here).
SHIPPED = {"world.yaml": MakeWorldConfig}


def test_every_shipped_config_loads_and_says_how_to_run():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and "python recipes/" in text, f"{path.name} must open with a comment giving the command"
        assert path.name in SHIPPED, f"{path.name}: add its config class to SHIPPED"
        load_config(SHIPPED[path.name], path)
    assert load_config(MakeWorldConfig, ROOT / "recipes/configs/world.yaml").world.n_impressions >= 20_000
