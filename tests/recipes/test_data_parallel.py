"""Pretraining and the reward model under torchrun with 2 CPU ranks (gloo): for the same global batch and seed the
loss curve equals one process's, and a checkpoint written by 2 ranks resumes in 1.

Tolerance: 1e-6 on each evaluated loss (held-out page NLL, validation MSE), 1e-5 on each step's training loss.
The ranks sum their halves of a batch in another order than one process sums all of it; over a few Adam steps
that moves the losses by about 1e-7 here. Fallback-token swaps are off (model.fallback_prob=0): with them each
rank draws its own swaps, a different sample of the same distribution than one process draws."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.helpers import ROOT, TINY_PRETRAIN, TINY_WORLD, run_recipe

pytestmark = pytest.mark.recipe

STEPS = ["steps=6", "eval_interval=1", "checkpoint_interval=3"]
PRETRAIN = [*TINY_PRETRAIN, *STEPS, "model.fallback_prob=0", "lr=0.003"]
RM = ["batch_size=16", "eval_sequences=200", "score_batch_size=64", "num_threads=1", "wandb_mode=disabled",
      "lr=0.003", "backbone_lr=0.001", "warmup_steps=2", "entity_loss_weight=4", "scratch_ablation=false",
      "generated_users=0", "eval_backend=hf", *STEPS]


def torchrun(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """recipes/<script> under torchrun (--standalone: a free local rendezvous port), asserting it succeeds."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(ROOT / "recipes" / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def drop_last_checkpoint(out: Path, ckpt: Path) -> None:
    """A run stopped after its step-3 checkpoint: the step-6 one and the final outputs are gone."""
    shutil.rmtree(ckpt / "step_6")
    (out / "summary.json").unlink()
    shutil.rmtree(out / "model")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    run_recipe("make_world.py", f"out_dir={out}", *TINY_WORLD)
    return out


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory) -> dict:
    """One process and 2 ranks on the same global batches: their summaries, and the 2-rank run's directory."""
    one, two = tmp_path_factory.mktemp("pt1"), tmp_path_factory.mktemp("pt2")
    run_recipe("pretrain.py", f"data_dir={world}", f"out_dir={one}", *PRETRAIN)
    proc = torchrun("pretrain.py", f"data_dir={world}", f"out_dir={two}", *PRETRAIN)
    assert "data parallel: 2 ranks, 8 of the global batch of 16 each" in proc.stdout
    return {"one": json.loads((one / "summary.json").read_text()), "two": json.loads((two / "summary.json").read_text()),
            "two_dir": two, "one_dir": one}


def assert_curves_match(a: list[dict], b: list[dict], key: str, tol: float) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(7))
    for x, y in zip(a, b):
        assert abs(x[key] - y[key]) <= tol, (key, x, y)


def test_pretraining_on_two_ranks_follows_the_one_process_loss_curve(pretrained):
    one, two = pretrained["one"], pretrained["two"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert_curves_match(one["loss_history"], two["loss_history"], "heldout_page_loss", 1e-6)
    for x, y in zip(one["loss_history"][1:], two["loss_history"][1:]):
        assert abs(x["train_loss"] - y["train_loss"]) <= 1e-5, (x, y)
    curve = [h["heldout_page_loss"] for h in one["loss_history"]]
    assert curve[-1] < curve[0] - 0.05  # it trained: the curves are not equal by standing still


def test_a_two_rank_pretraining_checkpoint_resumes_in_one_process(world, pretrained):
    out = pretrained["two_dir"]
    drop_last_checkpoint(out, out / "checkpoints")
    proc = run_recipe("pretrain.py", f"data_dir={world}", f"out_dir={out}", *PRETRAIN)
    assert "resuming from" in proc.stdout and "step 3" in proc.stdout
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["ranks"] == 1
    assert_curves_match(pretrained["one"]["loss_history"], resumed["loss_history"], "heldout_page_loss", 1e-6)


def test_the_reward_model_on_two_ranks_follows_the_one_process_loss_curve(world, pretrained, tmp_path):
    """The entity_feedback head's per-title loss is a mean over titles, which the ranks hold unequal numbers of."""
    model = pretrained["one_dir"] / "model"
    args = [f"data_dir={world}", f"pretrained_dir={model}", *RM]
    run_recipe("train_rm.py", f"out_dir={tmp_path / 'rm1'}", *args)
    torchrun("train_rm.py", f"out_dir={tmp_path / 'rm2'}", *args)
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("rm1", "rm2"))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert_curves_match(one["valid_loss_history"], two["valid_loss_history"], "valid_loss", 1e-6)
    curve = [h["valid_loss"] for h in one["valid_loss_history"]]
    assert min(curve[1:]) < curve[0] - 0.1  # it trained
