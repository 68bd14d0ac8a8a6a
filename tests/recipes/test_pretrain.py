"""recipes/pretrain.py on a tiny world and model, as subprocesses: it learns, it resumes, it fails clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY_WORLD = ["world.n_entities=60", "world.n_users=80", "world.n_impressions=1200", "world.batch_size=400"]
TINY_MODEL = [
    "model.hidden_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=1", "model.intermediate_size=128",
    "batch_size=16", "eval_sequences=64", "eval_users=16", "eval_backend=hf", "max_new_tokens=40", "wandb_mode=offline",
    "num_threads=1", "cold_start_titles=2",
]


def recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / name), *args]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    proc = subprocess.run(recipe("make_world.py", f"out_dir={out}", *TINY_WORLD), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def pretrain(world_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(recipe("pretrain.py", f"data_dir={world_dir}", f"out_dir={out}", *TINY_MODEL, *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc


def test_smoke_run_lowers_heldout_loss_and_writes_hf_model(world_dir, tmp_path):
    proc = pretrain(world_dir, tmp_path / "pt", "steps=30", "eval_interval=15", "checkpoint_interval=15", "lr=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "pt" / "summary.json").read_text())
    losses = [h["heldout_page_loss"] for h in summary["loss_history"]]
    assert [h["step"] for h in summary["loss_history"]] == [0, 15, 30]
    assert losses[-1] < losses[0] - 0.5, losses
    for key in ("heldout_page_loss", "unigram_page_loss", "popularity_page_loss", "true_reward_logging",
                "true_reward_pretrained_masked_sampled", "true_reward_pretrained_masked_greedy",
                "true_reward_pretrained_sampled", "true_reward_pretrained_greedy", "tokens_per_s"):
        assert isinstance(summary[key], float), key
    assert summary["cold_start"]["neighbour_rank_percentile"] > 0
    # The business rules travel in config.json; HF generation under them breaks no mask rule.
    config = json.loads((tmp_path / "pt" / "model" / "config.json").read_text())
    assert set(config["business_rules"]["config"]["modes"].values()) == {"mask"}
    for name in ("masked_sampled", "masked_greedy"):
        assert summary["rule_violations"][name]["total"] == 0, summary["rule_violations"]
    import policies  # noqa: F401  (registers GenPage with the Auto classes, as a user would)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pt" / "model")
    assert type(model).__name__ == "GenPageForCausalLM"
    assert AutoTokenizer.from_pretrained(tmp_path / "pt" / "model").eos_token == "[EOP]"
    assert list((tmp_path / "pt").glob("wandb/offline-run-*")), "wandb offline run missing"
    # Rerun: reuses the finished output.
    assert "reusing" in pretrain(world_dir, tmp_path / "pt", "steps=30").stdout


def test_killed_at_a_random_point_it_resumes_to_identical_weights(world_dir, tmp_path):
    """SIGKILL at a random point after the first checkpoint: the rerun resumes from the last one (tqdm counts on
    from there) and ends bit for bit where an uninterrupted run ends (batch order, RNG and optimizer come back)."""
    import random

    from safetensors.torch import load_file

    from tests.recipes.helpers import kill_when, outliving

    args = ["steps=120", "eval_interval=60", "checkpoint_interval=10", "eval_users=8", "lr=0.01"]
    full = pretrain(world_dir, tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "pt"
    cmd = recipe("pretrain.py", f"data_dir={world_dir}", f"out_dir={out}", *TINY_MODEL, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = kill_when(proc, lambda: bool(list((out / "checkpoints").glob("step_*/trainer_state.pt"))),
                     random.uniform(0.0, 1.5))
    assert not outliving(left)
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    saved = max(int(p.parent.name[5:]) for p in (out / "checkpoints").glob("step_*/trainer_state.pt"))
    again = pretrain(world_dir, out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{saved}'} at step {saved}" in again.stdout
    assert f"{saved}/120" in again.stderr  # the finished steps are not repeated
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    histories = [json.loads((d / "summary.json").read_text())["loss_history"] for d in (tmp_path / "full", out)]
    assert histories[0] == histories[1]


def test_missing_world_says_which_command_makes_it(tmp_path):
    proc = pretrain(tmp_path / "nothing", tmp_path / "pt")
    assert proc.returncode != 0 and "python recipes/make_world.py" in proc.stderr


def test_bad_config_fails_at_start(world_dir, tmp_path):
    proc = pretrain(world_dir, tmp_path / "pt", "eval_backend=tpu")
    assert proc.returncode == 2 and "eval_backend: 'tpu' is not one of 'vllm', 'hf'" in proc.stderr
