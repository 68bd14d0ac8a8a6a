"""Every shipped YAML loads into its recipe's typed config, every field of every recipe config has help, and each
recipe's `--help` shows it."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import recipe_parser
from common.config import config_fields, load_config
from homepage.config import MakeWorldConfig
from policies.config import PretrainConfig, WbcConfig
from reward_model.config import RewardModelConfig
from rl.config import CompareConfig, DrGrpoConfig, IterateConfig

ROOT = Path(__file__).parents[2]

# Every YAML under recipes/configs/, its typed config and its recipe (add new recipes here).
SHIPPED = {"world.yaml": (MakeWorldConfig, "make_world"), "pretrain.yaml": (PretrainConfig, "pretrain"),
           "train_rm.yaml": (RewardModelConfig, "train_rm"), "dr_grpo.yaml": (DrGrpoConfig, "dr_grpo"),
           "dr_grpo_long.yaml": (DrGrpoConfig, "dr_grpo"),
           "wbc.yaml": (WbcConfig, "wbc"), "compare.yaml": (CompareConfig, "compare"),
           "iterate.yaml": (IterateConfig, "iterate")}


def test_every_shipped_config_loads_and_says_how_to_run():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and "python recipes/" in text, f"{path.name} must open with a comment giving the command"
        assert path.name in SHIPPED, f"{path.name}: add its config class to SHIPPED"
        load_config(SHIPPED[path.name][0], path)
    assert load_config(MakeWorldConfig, ROOT / "recipes/configs/world.yaml").world.n_impressions >= 20_000
    recipes = {p.stem for p in (ROOT / "recipes").glob("*.py")}
    assert recipes == {recipe for _, recipe in SHIPPED.values()}, "every recipe has a shipped YAML"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_field_has_help_and_the_parser_shows_it(name):
    cls, recipe = SHIPPED[name]
    fields = config_fields(cls)
    assert len(fields) > 5
    missing = [field for field, _, _, text in fields if len(text.split()) < 2]
    assert not missing, f"{cls.__name__}: give these fields a help sentence: {missing}"
    text = recipe_parser(cls, f"recipes/configs/{name}", recipe).format_help()
    for field, tp, _, help_text in fields:
        assert f"  {field}  ({tp}" in text and help_text in text, field


@pytest.mark.recipe
def test_every_recipe_help_lists_its_fields():
    """The real command line: `python recipes/<stage>.py --help` for every recipe (each imports its recipe and
    parses nothing else; started together, since each mostly waits on its imports)."""
    procs = {recipe: subprocess.Popen([sys.executable, f"recipes/{recipe}.py", "--help"], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _, recipe in SHIPPED.values()}
    for cls, recipe in SHIPPED.values():
        stdout, stderr = procs[recipe].communicate(timeout=300)
        assert procs[recipe].returncode == 0, f"{recipe}: {stderr[-2000:]}"
        for field, _, _, help_text in config_fields(cls):
            assert f"  {field}  (" in stdout and help_text in stdout, f"{recipe}: {field}"


# The scale ladder (docs/scale.md): recipes/configs/scale/<rung>/<stage>.yaml, each stage's config by file name.
SCALE_STAGES = {"world.yaml": MakeWorldConfig, "pretrain.yaml": PretrainConfig, "train_rm.yaml": RewardModelConfig,
                "dr_grpo.yaml": DrGrpoConfig}


def test_every_scale_preset_loads_and_medium_has_the_ladders_sizes():
    rungs = {p.name: p for p in (ROOT / "recipes" / "configs" / "scale").iterdir() if p.is_dir()}
    assert {"medium", "large"} <= set(rungs)
    for rung in rungs.values():
        for path in sorted(rung.glob("*.yaml")):
            assert path.name in SCALE_STAGES, f"{path}: not a stage's config"
            assert path.read_text().startswith("#") and "recipes/" in path.read_text(), f"{path} must give its command"
            load_config(SCALE_STAGES[path.name], path)
    world = load_config(MakeWorldConfig, rungs["medium"] / "world.yaml").world
    assert (world.n_entities, world.n_users, world.n_impressions) == (20_000, 200_000, 2_000_000)
    model = load_config(PretrainConfig, rungs["medium"] / "pretrain.yaml").model
    # untied input and output embeddings over ~20,100 tokens, plus the layers: about 10 M parameters
    h, f, layers = model.hidden_size, model.intermediate_size, model.num_hidden_layers
    params = 2 * 20_100 * h + layers * (4 * h * h + 3 * h * f)
    assert 8e6 < params < 12e6 and h // model.num_attention_heads == 64
    for stage in ("pretrain.yaml", "train_rm.yaml", "dr_grpo.yaml"):  # each rung's stages read its own world
        assert load_config(SCALE_STAGES[stage], rungs["medium"] / stage).data_dir == "runs/scale/medium/world"
    # The multi-node GPU run is configuration: verl's nodes, GPUs per node and vLLM tensor parallel size.
    from rl.config import RunPaths, SequenceLengths, compose_verl_config, verl_overrides

    large = load_config(DrGrpoConfig, rungs["large"] / "dr_grpo.yaml")
    verl = compose_verl_config(verl_overrides(large, "m", RunPaths(Path("/tmp/x"), 0), 0, cpu=False,
                                              lengths=SequenceLengths(90, 55)))
    assert (verl.trainer.nnodes, verl.trainer.n_gpus_per_node) == (large.nnodes, large.ranks_per_node) and large.nnodes > 1
    assert verl.actor_rollout_ref.rollout.tensor_model_parallel_size == large.rollout_tp
    assert verl.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == large.micro_batch_pages
