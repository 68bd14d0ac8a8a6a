"""recipes/iterate.py end to end on a tiny world: round 1 is the Dr. GRPO smoke run (tests/recipes/conftest.py),
round 2 serves round 1's policy
through vLLM under the masks, logs the simulated outcomes, retrains the reward model on all the logs and runs
Dr. GRPO again from the served policy; the summary reports both rounds."""

import json
from pathlib import Path

import pytest

from tests.recipes.helpers import run_recipe as run

pytest.importorskip("verl")
pytest.importorskip("vllm")

# Round 2: one vLLM serving pass, a tiny reward-model training and one verl session (round 1 is the shared smoke run).
pytestmark = [pytest.mark.recipe, pytest.mark.ray, pytest.mark.timeout(900)]

TINY_ROUND_RL = ["steps=2", "prompts_per_step=4", "group_size=4", "eval_users=8", "save_freq=2", "lr=0.01",
                 "wandb_mode=disabled", "credit=page"]
TINY_ROUND_RM = ["steps=20", "eval_interval=20", "checkpoint_interval=20", "batch_size=16", "eval_sequences=64",
                 "score_batch_size=64", "scratch_ablation=false", "generated_users=0", "warmup_steps=2"]


def test_two_rounds_serve_log_retrain_and_continue_from_the_served_policy(rl_inputs, rl_smoke_run, tmp_path):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from homepage.dataset import open_dataset

    world, policy, rm = rl_inputs
    round1 = rl_smoke_run[0]  # seeds 0 and 1; the chain below continues seed 0
    out = tmp_path / "iterate"
    args = [f"data_dir={world}", f"pretrained_dir={policy}", f"rm_dir={rm}", f"first_round_dir={round1}",
            f"out_dir={out}", "rounds=2", "seeds=[0]", "impressions_per_round=40", "explore_fraction=0.25",
            "wandb_mode=disabled", f"rm_args=[{','.join(TINY_ROUND_RM)}]", f"dr_grpo_args=[{','.join(TINY_ROUND_RL)}]"]
    run("iterate.py", *args, timeout=880)
    r2 = out / "round_2" / "seed_0"

    # Round 2's log part: round 1's pages for train-split users, in the dataset's schema, ids past the base logs'.
    served = json.loads((r2 / "served.json").read_text())
    part = pq.read_table(r2 / "logs" / "part-r02-s0.parquet")
    assert served["requests"] == 40 and part.num_rows == served["served"] == 40 - served["not_served"] > 0
    assert set(part.column("policy").to_pylist()) == {"genpage_round1_seed0"}
    assert set(part.column("split").to_pylist()) == {"train"}
    _, base, _ = open_dataset(world)
    assert min(part.column("impression_id").to_pylist()) > max(base.column("impression_id").to_pylist())
    _, table, _ = open_dataset(r2 / "data")  # every check of the log reader, base and new rows together
    assert table.num_rows == base.num_rows + part.num_rows

    # The reward model retrained on those logs; Dr. GRPO from the served policy (its KL reference) on it.
    rm_summary = json.loads((r2 / "rm" / "summary.json").read_text())
    assert Path(rm_summary["config"]["data_dir"]).resolve() == (r2 / "data").resolve()
    rl = json.loads((r2 / "dr_grpo" / "summary.json").read_text())
    assert Path(rl["config"]["policy_dir"]).resolve() == (round1 / "seed_0" / "model").resolve()
    assert Path(rl["config"]["rm_dir"]).resolve() == (r2 / "rm" / "model").resolve()
    assert rl["config"]["prompt_seed"] == 2
    served_weights = load_file(round1 / "seed_0" / "model" / "model.safetensors")
    start = load_file(r2 / "dr_grpo" / "init_model" / "model.safetensors")
    assert all((served_weights[k] == start[k]).all() for k in served_weights)

    summary = json.loads((out / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["mask_violations"] == 0
    r2_figures = summary["per_seed"]["0"]["2"]
    assert r2_figures["end"]["true_reward"] == pytest.approx(rl["per_seed"]["0"]["rl"]["true_reward"])
    assert r2_figures["end"]["rm_truth_gap"] == pytest.approx(rl["rm_reward_rl"] - rl["true_reward_rl"])
    # gains are over the pretrained policy of round 1, not over each round's start
    assert summary["true_reward_pretrained"] == pytest.approx(
        json.loads((round1 / "summary.json").read_text())["true_reward_pretrained"])
    assert (out / "rounds.png").stat().st_size > 0 and "| 2 |" in (out / "results.md").read_text()
    assert "reusing" in run("iterate.py", *args).stdout
