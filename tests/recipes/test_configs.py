from pathlib import Path

from homepage.config import load_config
from homepage.world import MakeWorldConfig
from policies.configs import PretrainConfig
from reward_model.config import RewardModelConfig
from rl.config import DrGrpoConfig

ROOT = Path(__file__).parents[2]

# Every YAML under recipes/configs/ and the typed config it must load into (add new recipes here).
SHIPPED = {"world.yaml": MakeWorldConfig, "pretrain.yaml": PretrainConfig, "train_rm.yaml": RewardModelConfig,
           "dr_grpo.yaml": DrGrpoConfig}


def test_every_shipped_config_loads_and_says_how_to_run():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and "python recipes/" in text, f"{path.name} must open with a comment giving the command"
        assert path.name in SHIPPED, f"{path.name}: add its config class to SHIPPED"
        load_config(SHIPPED[path.name], path)
    assert load_config(MakeWorldConfig, ROOT / "recipes/configs/world.yaml").world.n_impressions >= 20_000
