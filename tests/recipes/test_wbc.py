"""recipes/wbc.py on a tiny world and model, as a subprocess: WBC lowers the held-out weighted BCE, reports the
paper's Table 1 beside its baselines, writes a checkpoint per seed that vLLM serves under the rule masks, and
resumes; recipes/compare.py then puts its seeds beside the pretrained policy."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.recipes.helpers import TINY_PRETRAIN, TINY_WORLD, untrained_reward_model

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


# Two WBC seeds, their vLLM serving check and a comparison run: past the suite's 120 s default on a slow day.
@pytest.mark.timeout(480)
def test_smoke_run_lowers_heldout_bce_reports_table_1_and_serves_on_vllm(inputs, tmp_path):
    world, pretrained = inputs
    out = tmp_path / "wbc"
    proc = recipe("wbc.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}", *TINY_WBC,
                  "eval_backend=vllm", "seeds=[0,1]")
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
    # Two seeds: each its own policy (a different batch order), both in the summary with their spread.
    a, b = (load_file(out / f"seed_{s}" / "model" / "model.safetensors") for s in (0, 1))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    assert summary["seeds"] == [0, 1] and summary["per_seed"]["0"]["entity_auc"] == summary["entity_auc_wbc"]
    aucs = [summary["per_seed"][s]["entity_auc"] for s in ("0", "1")]
    assert summary["entity_auc_wbc_mean_std"] == pytest.approx([np.mean(aucs), abs(aucs[0] - aucs[1]) / 2 ** 0.5])
    assert np.isfinite(summary["per_seed"]["1"]["true_reward_masked_greedy"]) and len(summary["train_s_per_seed"]) == 2
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["business_rules"] and (out / "model" / "genpage_tokenizer.json").exists()
    from policies.rules import RuleSet

    assert RuleSet.from_pretrained(out / "model").row_ids  # the rules' tables file saved with the model
    assert "reusing" in recipe("wbc.py", f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}",
                               *TINY_WBC).stdout
    # Checkpoints side by side (recipes/compare.py): Table 1 as the recipe's, on the same held-out pages; the
    # masked pages of every seed judged by one reward model, the budget read off the WBC run's summary.
    rm = untrained_reward_model(pretrained, tmp_path / "rm")
    compare = recipe("compare.py", f"data_dir={world}", f"rm_dir={rm}", f"out_dir={tmp_path / 'compare'}",
                     f"methods=[pretrained={pretrained},wbc={out}/seed_*/model]", "eval_users=8", "eval_sequences=100",
                     "eval_backend=hf", "max_new_tokens=40", "num_threads=1")
    assert compare.returncode == 0, compare.stderr[-3000:]
    result = json.loads((tmp_path / "compare" / "summary.json").read_text())
    methods = result["methods"]
    assert methods["pretrained"]["checkpoints"] == 1 and methods["wbc"]["checkpoints"] == 2
    assert methods["pretrained"]["entity_auc"]["mean"] == pytest.approx(summary["entity_auc_pretrained"], abs=1e-6)
    assert methods["wbc"]["entity_auc"]["per_seed"] == pytest.approx(aucs, abs=1e-6)
    for mode in ("masked_greedy", "masked_sampled"):
        assert methods["wbc"][mode]["violations"]["per_seed"] == [0, 0]
        assert np.isfinite(methods["wbc"][mode]["true_reward"]["mean"])
        assert methods["pretrained"][mode]["true_reward_gain"]["mean"] == pytest.approx(0.0)
    assert result["budgets"]["wbc"]["steps"] == 40 and result["budgets"]["wbc"]["pages_seen"] == 40 * 16
    assert result["budgets"]["wbc"]["train_s_per_seed"] == pytest.approx(np.mean(summary["train_s_per_seed"]))
    assert sorted(result["rankings"]["entity_auc"]) == ["pretrained", "wbc"]
    assert "| wbc | 2 |" in (tmp_path / "compare" / "results.md").read_text()


def test_zero_reward_ignored_trains_on_fewer_targets_and_a_killed_run_resumes(inputs, tmp_path):
    world, pretrained = inputs
    out = tmp_path / "wbc"
    args = [f"data_dir={world}", f"pretrained_dir={pretrained}", f"out_dir={out}", *TINY_WBC, "eval_backend=hf",
            "zero_reward=ignore", "scratch_ablation=false", "seeds=[0]"]
    first = recipe("wbc.py", *args, "steps=20")  # stands in for a run killed after its step-20 checkpoint
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "summary.json").unlink()
    again = recipe("wbc.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "at step 20" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20 and "entity_auc_wbc_scratch" not in summary
