"""recipes/train_rm.py on a tiny world and model, as subprocesses: it learns, resumes, and fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY_WORLD = ["world.n_entities=60", "world.n_users=150", "world.n_impressions=2000", "world.batch_size=500"]
TINY_RM = ["batch_size=16", "eval_sequences=200", "score_batch_size=64", "num_threads=1", "wandb_mode=offline",
           "lr=0.003", "backbone_lr=0.001", "warmup_steps=5", "entity_loss_weight=4",
           "scratch_ablation=true"]  # both initializations: what the pipeline tests are about


def recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / name), *args]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(world dir, "pretrained" GenPage dir): a tiny world and a freshly built tiny model with its tokenizer
    (the recipe takes any GenPage checkpoint; pretraining it is not what these tests are about)."""
    world = tmp_path_factory.mktemp("world")
    proc = subprocess.run(recipe("make_world.py", f"out_dir={world}", *TINY_WORLD), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from homepage.dataset import open_dataset
    from policies.build import ModelSize, build_model
    from policies.tokenizer import GenPageTokenizer

    dataset, table, _ = open_dataset(world)
    tok = GenPageTokenizer.from_dataset(dataset, table)
    pretrained = tmp_path_factory.mktemp("pretrained")
    size = ModelSize(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128)
    build_model(tok, dataset.content(), size, seed=0).save_pretrained(pretrained)
    tok.save_pretrained(pretrained)
    return world, pretrained


def train_rm(inputs, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    world, pretrained = inputs
    return subprocess.run(recipe("train_rm.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}",
                                 *TINY_RM, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_smoke_run_lowers_validation_loss_and_writes_a_scorer(inputs, tmp_path):
    out = tmp_path / "rm"
    proc = train_rm(inputs, out, "steps=80", "eval_interval=40", "checkpoint_interval=40", "generated_users=6",
                    "eval_backend=hf", "max_new_tokens=40", "num_threads=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes x 1 thread(s)" in proc.stdout  # both initializations trained at once
    summary = json.loads((out / "summary.json").read_text())
    for init in ("", "scratch_"):
        losses = [h["valid_loss"] for h in summary[f"{init}valid_loss_history"]]
        assert [h["step"] for h in summary[f"{init}valid_loss_history"]] == [0, 40, 80]
        assert losses[-1] < losses[0] - 0.05, (init, losses)
    for key in ("mse", "pearson_observed", "spearman_observed", "gt_pearson_logged", "gt_pairwise_acc_logged",
                "gt_pairwise_acc_generated", "scratch_mse", "scratch_gt_pairwise_acc_logged", "baseline_mean_mse",
                "baseline_linear_mse"):
        assert isinstance(summary[key], float) and np.isfinite(summary[key]), key
    assert summary["mse"] < summary["baseline_mean_mse"]
    assert summary["gt_pairs_logged"] > 50 and summary["gt_pairs_generated"] > 0
    for name in ("results.md", "pred_vs_observed.png", "model/genpage_tokenizer.json", "scratch_model/config.json"):
        assert (out / name).exists(), name
    assert len(list(out.glob("wandb/offline-run-*"))) == 2, "one offline wandb run per initialization"

    from reward_model.scoring import PageRewardScorer

    scorer = PageRewardScorer.from_pretrained(out / "model")
    assert scorer.reward_mean == summary["reward_mean"] and scorer.reward_std == summary["reward_std"]
    gen = json.loads((out / "generated_pages.json").read_text())
    scores = scorer.score(gen["prompts"], gen["pages"])
    assert scores.shape == (12,) and abs(scores.mean() - summary["pred_mean_generated"]) < 1e-6
    # Rerun: reuses the finished output.
    assert "reusing" in train_rm(inputs, out, "steps=80").stdout


def test_training_at_once_equals_training_in_turn(inputs, tmp_path):
    """Each child process trains exactly what the sequential loop would (same data, order, seeds, threads)."""
    args = ["steps=15", "eval_interval=15", "checkpoint_interval=15", "generated_users=0"]
    together = train_rm(inputs, tmp_path / "together", *args, "num_threads=2")
    in_turn = train_rm(inputs, tmp_path / "in_turn", *args, "num_threads=1", "parallel_inits=false")
    assert together.returncode == 0 and in_turn.returncode == 0, (together.stderr[-2000:], in_turn.stderr[-2000:])
    assert "at once" in together.stdout and "at once" not in in_turn.stdout
    from safetensors.torch import load_file

    for model in ("model", "scratch_model"):
        a = load_file(tmp_path / "together" / model / "model.safetensors")
        b = load_file(tmp_path / "in_turn" / model / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), model
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("together", "in_turn"))
    assert s1["mse"] == s2["mse"] and s1["scratch_gt_pairwise_acc_logged"] == s2["scratch_gt_pairwise_acc_logged"]


def start_until_checkpointed(inputs, out: Path, args: list[str], inits: list[str]) -> subprocess.Popen:
    """train_rm.py started in its own session, returned once every init in `inits` has a complete checkpoint."""
    world, pretrained = inputs
    cmd = recipe("train_rm.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}", *TINY_RM, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while (not all(list((out / "checkpoints" / i).glob("step_*/trainer_state.pt")) for i in inits)
           and time.time() < deadline):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    return proc


def test_killed_run_resumes_from_last_checkpoint_to_identical_weights(inputs, tmp_path):
    """SIGKILL at a random point after the first checkpoint; the resumed run ends bit for bit where an
    uninterrupted one ends (batch order, RNG, optimizer and EMA state all come back)."""
    import random

    from safetensors.torch import load_file

    out = tmp_path / "rm"
    args = ["steps=300", "eval_interval=1000", "checkpoint_interval=10", "generated_users=0", "scratch_ablation=false"]
    proc = start_until_checkpointed(inputs, out, args, ["pretrained"])
    time.sleep(random.uniform(0.0, 1.0))
    ckpts = out / "checkpoints" / "pretrained"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_done = [int(p.parent.name.split("_")[1]) for p in ckpts.glob("step_*/trainer_state.pt")]
    assert steps_done and max(steps_done) < 300, "the run finished before it could be killed"
    saved = torch.load(max(ckpts.glob("step_*"), key=lambda p: int(p.name[5:])) / "trainer_state.pt",
                       weights_only=True)["step"]
    again = train_rm(inputs, out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and f"at step {saved}" in again.stdout
    assert f"{saved}/300" in again.stderr  # tqdm counts from the resumed step: finished steps are not repeated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == saved and summary["valid_loss_history"][-1]["step"] == 300
    assert summary["scratch_mse"] is None  # the ablation was switched off
    full = train_rm(inputs, tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (out, tmp_path / "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["mse"] == summary["mse"]


def test_killed_parent_takes_its_training_processes_along_and_both_resume(inputs, tmp_path):
    psutil = pytest.importorskip("psutil")  # as common/processes.py uses it
    from tests.recipes.helpers import outliving

    out = tmp_path / "rm"
    args = ["steps=150", "eval_interval=1000", "checkpoint_interval=10", "generated_users=0", "num_threads=2"]
    proc = start_until_checkpointed(inputs, out, args, ["pretrained", "scratch"])
    ckpts = [out / "checkpoints" / init for init in ("pretrained", "scratch")]
    trainers = psutil.Process(proc.pid).children()
    assert trainers, "the two initializations train in child processes"
    os.kill(proc.pid, signal.SIGKILL)  # the recipe alone: its children get no signal
    proc.wait()
    assert not outliving(trainers, timeout_s=20), "training processes outlived the killed recipe"
    saved = {c.name: max(int(p.parent.name[5:]) for p in c.glob("step_*/trainer_state.pt")) for c in ckpts}
    assert all(s < 150 for s in saved.values()), "the run finished before it could be killed"
    again = train_rm(inputs, out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == saved["pretrained"] and summary["scratch_resumed_from_step"] == saved["scratch"]


@pytest.mark.parametrize("field, row, value", [("hour", 3, 30), ("page_reward", 7, float("nan"))])
def test_malformed_log_row_is_named(inputs, tmp_path, field, row, value):
    """An hour out of range and a NaN page reward (the regression target), both refused by the log reader
    (homepage/validation.py): the error names the row and the field."""
    import pyarrow as pa

    import shutil

    world, _ = inputs
    data = tmp_path / "data"  # the same dataset with one mutated log part
    logs = data / "logs"
    logs.mkdir(parents=True)
    for name in ("dataset.yaml", "catalog.parquet"):
        shutil.copy(world / name, data / name)
    first = sorted((world / "logs").glob("*.parquet"))[0]
    table = pq.read_table(first)
    values = table.column(field).to_numpy().copy()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(field), field, pa.array(values, table.schema.field(field).type))
    pq.write_table(table, logs / first.name)
    proc = train_rm(inputs, tmp_path / "rm", f"data_dir={data}")
    assert proc.returncode != 0
    assert f"row {row}" in proc.stderr and f"field '{field}'" in proc.stderr, proc.stderr[-2000:]


def test_missing_inputs_say_which_command_makes_them(inputs, tmp_path):
    world, pretrained = inputs
    proc = subprocess.run(recipe("train_rm.py", f"data_dir={tmp_path / 'nothing'}", f"out_dir={tmp_path / 'rm'}"),
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "python recipes/make_world.py" in proc.stderr
    proc = subprocess.run(recipe("train_rm.py", f"data_dir={world}", f"pretrained_dir={tmp_path / 'nothing'}",
                                 f"out_dir={tmp_path / 'rm'}"), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "python recipes/pretrain.py" in proc.stderr
