"""What several recipe test modules start from: a tiny world, its pretrained model and an untrained reward model,
and one Dr. GRPO smoke run of two seeds on them (tests/recipes/test_dr_grpo.py checks it; recipes/iterate.py's
test continues it as its round 1)."""

import pytest

from tests.recipes.helpers import TINY_MODEL, TINY_RL, TINY_WORLD, run_recipe, untrained_reward_model


@pytest.fixture(scope="session")
def rl_inputs(tmp_path_factory):
    """(dataset directory, pretrained policy, reward model) at smoke size."""
    root = tmp_path_factory.mktemp("dr_grpo_inputs")
    run_recipe("make_world.py", f"out_dir={root / 'world'}", *TINY_WORLD)
    run_recipe("pretrain.py", f"data_dir={root / 'world'}", f"out_dir={root / 'pt'}", *TINY_MODEL)
    return root / "world", root / "pt" / "model", untrained_reward_model(root / "pt" / "model", root / "rm")


@pytest.fixture(scope="session")
def rl_smoke_run(rl_inputs, tmp_path_factory):
    """recipes/dr_grpo.py with TINY_RL on rl_inputs -> (its out_dir, the finished process, the shared-memory
    segments that existed before it)."""
    from common.processes import shm_segments

    world, policy, rm = rl_inputs
    shm_before = shm_segments()
    out = tmp_path_factory.mktemp("dr_grpo_smoke") / "rl"
    proc = run_recipe("dr_grpo.py", f"data_dir={world}", f"policy_dir={policy}", f"rm_dir={rm}", f"out_dir={out}", *TINY_RL)
    return out, proc, shm_before
