"""recipes/dr_grpo.py end to end on a tiny world and model (verl's real trainer, vLLM rollouts under the rule
masks, our reward manager): the policy moves, metrics and the evaluation are written, nothing is left running."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipes.helpers import TINY_RL, run_recipe as run, untrained_reward_model

pytest.importorskip("verl")
pytest.importorskip("vllm")

# The timeout covers the inputs (make_world, pretrain), one verl run of two seeds and the reusing rerun.
pytestmark = [pytest.mark.recipe, pytest.mark.ray, pytest.mark.timeout(300)]

ROOT = Path(__file__).parents[2]


def test_smoke_run_moves_the_policy_and_writes_metrics(rl_inputs, rl_smoke_run):
    world, policy, rm = rl_inputs
    from common.processes import leftover_shm

    out, proc, shm_before = rl_smoke_run
    # Quiet logs: vLLM's per-sync "RotaryEmbedding: Failed to load weights" and the offline engines' chat-warmup
    # traceback are filtered in every process, Ray's workers included (policies/vllm_plugin.py).
    console = proc.stdout + proc.stderr
    assert "Failed to load weights" not in console and "Chat template warmup failed" not in console

    # The RL policy is an HF directory whose weights moved away from the pretrained ones.
    import torch
    from safetensors.torch import load_file

    before = load_file(out / "init_model" / "model.safetensors")
    for seed in (0, 1):  # two seeds in one session: the second starts again from the pretrained policy
        after = load_file(out / f"seed_{seed}" / "model" / "model.safetensors")
        assert before.keys() == after.keys()
        moved = max((after[k] - before[k]).abs().max().item() for k in before)
        assert moved > 1e-4, (seed, moved)
        assert all(v.dtype == torch.float32 for v in after.values())
    from policies.rules import RuleSet

    exported = RuleSet.from_pretrained(out / "model")  # the rules' tables file came through verl's HF export
    assert exported.config == RuleSet.from_pretrained(out / "init_model").config

    # Per-step metrics from verl's logger: ours next to verl's, for both steps.
    lines = [json.loads(x) for x in (out / "seed_1" / "metrics" / "attempt_0.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["data"] for r in lines}
    assert steps[1]["actor/kl_loss"] == 0  # seed 1's first step: policy == reference again
    for step in (1, 2):
        for key in ("rollout/rm_reward", "rollout/true_reward", "rollout/format_reward", "page/diversity",
                    "page/coverage", "rules/violations/total", "actor/kl_loss", "actor/entropy",
                    "training/rollout_probs_diff_max"):
            assert key in steps[step], (step, key)
        assert steps[step]["training/rollout_probs_diff_max"] < 1e-3  # rule masks replayed in the trainer, fp32
        assert steps[step]["rules/violations/total"] == 0
    for seed in (0, 1):
        assert list((out / f"seed_{seed}" / "wandb").glob("offline-run-*")), "wandb offline run missing"

    # The pretrained policy is validated once, before seed 0's first step; each seed's RL policy after its last.
    assert sorted(p.name for p in (out / "seed_0" / "validation").glob("*.jsonl")) == ["0.jsonl", "2.jsonl"]
    assert sorted(p.name for p in (out / "seed_1" / "validation").glob("*.jsonl")) == ["2.jsonl"]

    summary = json.loads((out / "summary.json").read_text())
    for key in ("true_reward_logging", "true_reward_pretrained", "true_reward_rl", "true_reward_gain",
                "rm_reward_pretrained", "rm_reward_rl", "diversity_pretrained", "diversity_rl", "mask_violations",
                "rollout_probs_diff_max", "seeds", "wall_s"):
        assert key in summary, key
    assert summary["mask_violations"] == 0 and summary["seeds"] == [0, 1] and summary["pretrained_validation_seed"] == 0
    assert summary["per_seed"]["0"]["pretrained"] == summary["per_seed"]["1"]["pretrained"]
    per_seed = [summary["per_seed"][s]["rl"]["true_reward"] / summary["per_seed"][s]["pretrained"]["true_reward"] - 1
                for s in ("0", "1")]
    assert summary["true_reward_gain_per_seed"] == pytest.approx(per_seed)
    # the sample standard deviation of two values a, b is |a - b| / sqrt(2)
    assert summary["true_reward_gain_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    assert "| rl |" in (out / "results.md").read_text()
    import pyarrow.parquet as pq

    train = pq.read_table(out / "data" / "train.parquet").column("extra_info").to_pylist()
    assert len(train) == 2 * 4 and all(i["engaged"] == [] for i in train)  # fresh contexts: no logged page
    assert (out / "curves.png").stat().st_size > 0

    # Clean shutdown: no shared-memory segment of the run is left behind (new ones still mapped belong to
    # processes of others running beside this test).
    assert not leftover_shm(shm_before)
    # A finished run is reused.
    assert "reusing" in run("dr_grpo.py", f"data_dir={world}", f"policy_dir={policy}", f"rm_dir={rm}",
                            f"out_dir={out}", *TINY_RL).stdout


@pytest.mark.timeout(900)
def test_killed_run_resumes_from_its_last_verl_checkpoint_and_leaves_nothing_behind(rl_inputs, tmp_path):
    """kill -9 of the recipe at a random point after its first verl checkpoint: Ray, its workers, the vLLM
    server and the trainer go with it (common/processes.py), no shared-memory segment of the run stays, and
    the rerun continues from the checkpoint instead of starting again."""
    import random

    from common.processes import leftover_shm, shm_segments
    from tests.recipes.helpers import kill_when, outliving

    world, policy, rm = rl_inputs
    out = tmp_path / "rl"
    args = [f"data_dir={world}", f"policy_dir={policy}", f"rm_dir={rm}", f"out_dir={out}", "steps=4", "seeds=[0]",
            "prompts_per_step=4", "group_size=4", "eval_users=8", "save_freq=1", "lr=0.01", "wandb_mode=offline",
            "prompt_source=environment"]
    shm_before = shm_segments()
    latest = out / "seed_0" / "checkpoints" / "latest_checkpointed_iteration.txt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "dr_grpo.py"), *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    left = kill_when(proc, latest.exists, random.uniform(0.0, 2.0))
    saved = int(latest.read_text())
    assert not outliving(left, timeout_s=60), "processes outlived the killed recipe"
    deadline = time.time() + 30
    while leftover_shm(shm_before) and time.time() < deadline:
        time.sleep(0.5)
    assert not leftover_shm(shm_before), "the run's shared memory was left behind"
    assert saved < 4, "the run finished before it was killed"
    again = run("dr_grpo.py", *args)
    attempts = sorted((out / "seed_0" / "metrics").glob("attempt_*.jsonl"))
    resumed = [json.loads(x)["step"] for x in attempts[-1].read_text().splitlines()]
    assert len(attempts) == 2 and resumed[0] == saved + 1 and resumed[-1] == 4, (saved, resumed, again.stdout[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0] and summary["mask_violations"] == 0


def test_token_credit_on_a_conservative_ensemble_stopped_early_by_a_validator(rl_inputs, tmp_path):
    """The middle ground between WBC and Dr. GRPO (credit=token, rl/advantage.py) through verl's trainer: the
    per-token rewards of the reward model's entity_sum head reach the update, which then gives the tokens of a
    page different advantages (under page credit they share one). The reward is a two-member ensemble scored
    conservatively; a flat validator (every page scores the same, so it never improves) stops the run early:
    with patience 1 the decision comes at step 2, and step 3 is the last of the 6 configured."""
    world, policy, rm = rl_inputs
    member = untrained_reward_model(policy, tmp_path / "rm_1", seed=1)
    validator = untrained_reward_model(policy, tmp_path / "rm_flat", seed=2, flat=True)
    out = tmp_path / "rl"
    run("dr_grpo.py", f"data_dir={world}", f"policy_dir={policy}", f"rm_dir={rm}", f"out_dir={out}", "credit=token",
        f"rm_ensemble=[{member}]", "rm_ensemble_k=1.0", f"validator_rm_dir={validator}", "early_stop_patience=1",
        "early_stop_window=1", "steps=6", "seeds=[0]", "prompts_per_step=4", "group_size=4", "eval_users=8",
        "save_freq=2", "lr=0.01", "wandb_mode=disabled", "prompt_source=environment")
    lines = [json.loads(x) for x in (out / "seed_0" / "metrics" / "attempt_0.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["data"] for r in lines}
    assert sorted(s for s in steps if s >= 1) == [1, 2, 3]  # stopped early (step 0: the pretrained validation)
    for step in (1, 2, 3):
        assert steps[step]["credit/within_page_advantage_std"] > 1e-4, step
        assert steps[step]["rules/violations/total"] == 0
        assert steps[step]["training/rollout_probs_diff_max"] < 1e-3
        assert steps[step]["rollout/rm_ensemble_std"] > 0  # two different heads disagree
        gap = steps[step]["rollout/rm_reward"] - steps[step]["rollout/validator_reward"]
        assert steps[step]["rollout/rm_validator_gap"] == pytest.approx(gap, abs=1e-6)
        assert "rollout/rm_truth_gap" in steps[step]
    assert steps[3]["early_stop/last_step"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["credit"] == "token" and summary["mask_violations"] == 0
    assert summary["steps_per_seed"] == {"0": 3} and [r["step"] for r in summary["gap_per_step"]] == [1, 2, 3]
    assert (out / "seed_0" / "model" / "model.safetensors").exists()
    assert [r["step"] for r in summary["heldout_per_step"]] == [0, 3]  # the pretrained and the final policy validated


def test_token_credit_refuses_a_reward_model_without_per_token_rewards(rl_inputs, tmp_path):
    world, policy, _ = rl_inputs
    last = untrained_reward_model(policy, tmp_path / "rm_last", head="last")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "dr_grpo.py"), f"data_dir={world}", f"policy_dir={policy}",
                           f"rm_dir={last}", f"out_dir={tmp_path / 'rl'}", "credit=token"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "'last' head" in proc.stderr and "reward_head=entity_feedback" in proc.stderr
    assert not (tmp_path / "rl").exists()  # refused before anything is written


@pytest.mark.timeout(600)
def test_two_fsdp_ranks_take_the_one_rank_step(rl_inputs, rl_smoke_run, tmp_path):
    """ranks_per_node=2: verl's FSDP actor and reference on 2 CPU ranks (gloo), one vLLM replica each, the same
    global batch (4 prompts x 4 pages, 8 pages per rank). Pages are seeded per request (rollout_seeding=request),
    so step 1 samples the pages the one-rank smoke run sampled, and the step must be the same.

    Tolerances: the gradient norm within 1e-5 (relative) and the loss within 1e-6 (each rank sums its half of the
    batch, then the halves are averaged: another order of the same float sum); the weights after the step within
    1e-7 on average and 1e-3 (a tenth of the step, lr=0.01) at most: Adam's first step is lr x g / (|g| + eps), so a
    weight whose gradient is near zero turns a last-bit difference of g into a visible one."""
    import torch
    from safetensors.torch import load_file

    world, policy, rm = rl_inputs
    one, _, _ = rl_smoke_run
    two = tmp_path / "rl2"
    args = [a for a in TINY_RL if not a.startswith("seeds=")]  # steps too: they size the prompt set it shuffles
    run("dr_grpo.py", f"data_dir={world}", f"policy_dir={policy}", f"rm_dir={rm}", f"out_dir={two}", *args,
        "seeds=[0]", "ranks_per_node=2", "num_threads=1", "wandb_mode=disabled")

    def step_1(out: Path) -> dict:
        lines = [json.loads(x) for x in (out / "seed_0" / "metrics" / "attempt_0.jsonl").read_text().splitlines()]
        return {r["step"]: r["data"] for r in lines}[1]

    a, b = step_1(one), step_1(two)
    for key in ("rollout/rm_reward", "rollout/true_reward", "page/diversity", "response_length/mean"):
        assert b[key] == pytest.approx(a[key], abs=1e-9), key  # the same pages
    assert b["actor/grad_norm"] == pytest.approx(a["actor/grad_norm"], rel=1e-5)
    assert b["actor/pg_loss"] == pytest.approx(a["actor/pg_loss"], abs=1e-6)
    assert a["actor/grad_norm"] > 0 and abs(a["actor/pg_loss"]) > 1e-4  # a step that moved something

    hf = Path("checkpoints") / "global_step_1" / "actor" / "huggingface" / "model.safetensors"
    before, w1, w2 = (load_file(p) for p in (policy / "model.safetensors", one / "seed_0" / hf, two / "seed_0" / hf))
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    moved = torch.cat([(w1[k] - before[k]).abs().flatten() for k in w1 if k in before])
    assert moved.max() > 5e-3  # one Adam step of lr 0.01
    assert diff.mean() < 1e-7 and diff.max() < 1e-3, (diff.mean().item(), diff.max().item())
    assert (two / "seed_0" / "model" / "model.safetensors").exists() and json.loads((two / "summary.json").read_text())["ranks"] == 2
