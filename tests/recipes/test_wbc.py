"""recipes/wbc.py on a tiny world and model, as a subprocess: WBC lowers the held-out weighted BCE, reports the
paper's Table 1 beside its baselines, writes a checkpoint that vLLM serves under the rule masks, and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.recipes.helpers import TINY_PRETRAIN, TINY_WORLD

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY_MODEL = [*TINY_PRETRAIN, "steps=30", "eval_interval=30", "checkpoint_interval=30"]
TINY_WBC = ["steps=40", "batch_size=16", "eval_interval=20", "checkpoint_interval=20", "eval_sequences=100",
            "eval_users=8", "max_new_tokens=40", "num_threads=1", "wandb_mode=offline", "lr=0.003"]


def recipe(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wbc_inputs")
    for name, args in (("make_world.py", [f"out_dir={root / 'world'}", *TINY_WORLD]),
                       ("pretrain.py", [f"data_dir={root / 'world'}", f"out_dir={root / 'pt'}", *TINY_MODEL])):
        proc = recipe(name, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "world", root / "pt" / "model"


def test_smoke_run_lowers_heldout_bce_reports_table_1_and_serves_on_vllm(inputs, tmp_path):
    world, pretrained = inputs
    out = tmp_path / "wbc"
    proc = recipe("wbc.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}", *TINY_WBC,
                  "eval_backend=vllm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    history = [h["heldout_weighted_bce"] for h in summary["heldout_weighted_bce_history"]]
    assert [h["step"] for h in summary["heldout_weighted_bce_history"]] == [0, 20, 40]
    assert history[-1] < history[0] - 0.05, history
    for scorer in ("pretrained", "popularity", "wbc", "wbc_scratch"):
        for metric in ("weighted_bce", "row_auc", "entity_auc"):
            assert np.isfinite(summary[f"{metric}_{scorer}"]), (metric, scorer)
    assert summary["weighted_bce_wbc"] < summary["weighted_bce_pretrained"]  # logits as values: WBC fits them
    # The checkpoint: vLLM serves it (HF/vLLM log-probs agree) and its masked pages break no rule.
    assert summary["vllm_hf_max_abs_logprob_diff"] < 1e-3
    for mode in ("masked_sampled", "masked_greedy"):
        assert summary["rule_violations"][mode]["total"] == 0, summary["rule_violations"]
        assert np.isfinite(summary[f"true_reward_wbc_{mode}"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["business_rules"] and (out / "model" / "genpage_tokenizer.json").exists()
    assert "reusing" in recipe("wbc.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}",
                               *TINY_WBC).stdout
    # Checkpoints side by side (python -m policies.wbc): the same Table 1 as the recipe's, on the same pages.
    compare = subprocess.run([sys.executable, "-m", "policies.wbc", "--data", str(world), "--models", str(pretrained),
                              str(out / "model"), "--eval-users", "8", "--eval-sequences", "100", "--backend", "hf"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert compare.returncode == 0, compare.stderr[-3000:]
    rows = [json.loads(line) for line in compare.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == [str(pretrained), str(out / "model")]
    for row, name in zip(rows, ("pretrained", "wbc")):
        assert row["entity_auc"] == pytest.approx(summary[f"entity_auc_{name}"], abs=1e-6)
        assert row["row_auc"] == pytest.approx(summary[f"row_auc_{name}"], abs=1e-6)
    assert rows[1]["violations_masked"] == 0 and np.isfinite(rows[1]["true_reward_masked_greedy"])


def test_zero_reward_ignored_trains_on_fewer_targets_and_a_killed_run_resumes(inputs, tmp_path):
    world, pretrained = inputs
    out = tmp_path / "wbc"
    args = [f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}", *TINY_WBC, "eval_backend=hf",
            "zero_reward=ignore", "scratch_ablation=false"]
    first = recipe("wbc.py", *args, "steps=20")  # stands in for a run killed after its step-20 checkpoint
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "summary.json").unlink()
    again = recipe("wbc.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "at step 20" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20 and "entity_auc_wbc_scratch" not in summary
