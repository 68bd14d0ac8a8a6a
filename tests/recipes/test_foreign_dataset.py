"""Every stage on a dataset directory unlike the toy world and without a simulator (tests/datasets/music.py, toy
sized): pretrain, train_rm, dr_grpo (with token credit), wbc, compare and policies.generate run from the
directory alone, report only what the logs allow, and break no mask rule; an environment plugged by dotted path
brings the true_* figures back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import music

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY_MODEL = ["model.hidden_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=1",
              "model.intermediate_size=128", "batch_size=16", "eval_sequences=64", "eval_users=24", "eval_backend=hf",
              "max_new_tokens=56", "wandb_mode=disabled", "num_threads=1", "cold_start_titles=2", "steps=30",
              "eval_interval=30", "checkpoint_interval=30", "lr=0.01"]
TINY_RM = ["steps=30", "batch_size=16", "eval_sequences=100", "score_batch_size=64", "num_threads=1", "wandb_mode=disabled",
           "eval_interval=30", "checkpoint_interval=30", "scratch_ablation=false", "eval_backend=hf"]
# Token credit here (the reward model's trained entity_feedback head splits each page's reward over its tokens);
# tests/recipes/test_dr_grpo.py covers page credit.
TINY_RL = ["steps=2", "seeds=[0]", "prompts_per_step=4", "group_size=4", "eval_users=8", "save_freq=2", "lr=0.01",
           "wandb_mode=disabled", "credit=token"]
TINY_WBC = ["steps=30", "batch_size=16", "eval_interval=30", "checkpoint_interval=30", "eval_sequences=100",
            "eval_users=8", "max_new_tokens=56", "num_threads=1", "wandb_mode=disabled", "eval_backend=hf",
            "seeds=[0]", "scratch_ablation=false"]


def run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the plugged environment lives in tests/
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("music_stages")
    data = music.write(root / "data", n_titles=240, n_users=300, n_impressions=1500, seed=0)
    run("pretrain.py", f"data_dir={data}", f"out_dir={root / 'pt'}", *TINY_MODEL)
    run("train_rm.py", f"data_dir={data}", f"pretrained_dir={root / 'pt' / 'model'}", f"out_dir={root / 'rm'}",
        "generated_users=8", *TINY_RM)
    return data, root


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def assert_pages_follow_the_rules(data, model_dir, temperature: float) -> None:
    """Pages from `model_dir` through the generation API for 16 held-out contexts break none of its rules'
    masks and start with the pinned row."""
    from homepage.dataset import open_dataset
    from homepage.logs import sample_impressions
    from policies.generate import PageGenerator

    _, table, _ = open_dataset(data)
    contexts = [i.context for i in sample_impressions(table, "test", 16, seed=3)]
    gen = PageGenerator(model_dir, backend="hf")
    results = gen.generate(contexts, temperature=temperature)
    prompts = [gen.tok.encode_context(c) for c in contexts]
    assert gen.rules.violations(prompts, [r.page_ids for r in results])["total"].sum() == 0
    assert all(r.page.rows and r.page.rows[0].row_id == "staff_picks" for r in results)  # pinned first


def test_pretrain_and_reward_model_report_what_the_logs_allow(stages):
    data, root = stages
    pt = summary(root / "pt")
    assert pt["environment"] is None and not [k for k in pt if k.startswith("true_reward")]
    assert pt["loss_history"][-1]["heldout_page_loss"] < pt["loss_history"][0]["heldout_page_loss"]
    for name in ("logging", "masked_sampled", "masked_greedy"):
        assert 0 <= pt[f"recall_{name}"] <= 1, name
    assert pt["rule_violations"]["masked_sampled"]["total"] == 0 and pt["rule_violations"]["masked_greedy"]["total"] == 0
    rm = summary(root / "rm")
    assert rm["feedback_rewards"] == pytest.approx(music.REWARDS, abs=1e-3)  # the dataset's own reward table
    assert rm["thumbs_up_reward"] == pytest.approx(music.LIKE, abs=1e-3)
    assert rm["environment"] is None and "gt_pearson_logged" not in rm and rm["mse"] > 0


def test_a_plugged_environment_produces_the_true_figures(stages, tmp_path):
    data, root = stages
    run("pretrain.py", f"data_dir={data}", f"out_dir={tmp_path / 'pt'}", *TINY_MODEL,
        "environment=tests.datasets.music:FamilySafeShare")
    pt = summary(tmp_path / "pt")
    assert pt["environment"] == "FamilySafeShare"
    # the logged pages of the held-out contexts, scored by the plugged environment
    from homepage.dataset import open_dataset
    from homepage.logs import sample_impressions

    dataset, table, _ = open_dataset(data)
    env = music.FamilySafeShare(dataset)
    held = sample_impressions(table, "test", 24, seed=0)
    assert pt["true_reward_logging"] == pytest.approx(env.true_page_reward(None, [i.page for i in held]).mean())
    assert pt["true_reward_pretrained_masked_greedy"] > 0


@pytest.mark.ray
@pytest.mark.timeout(180)  # a verl run
def test_dr_grpo_and_generation_run_on_the_dataset_alone(stages, tmp_path):
    data, root = stages
    out = tmp_path / "rl"
    run("dr_grpo.py", f"data_dir={data}", f"policy_dir={root / 'pt' / 'model'}", f"rm_dir={root / 'rm' / 'model'}",
        f"out_dir={out}", *TINY_RL)
    s = summary(out)
    assert s["environment"] is None and "true_reward_gain" not in s and s["config"]["credit"] == "token"
    assert s["mask_violations"] == 0 and 0 <= s["recall_rl"] <= 1 and 0 <= s["recall_logging"] <= 1
    assert "engaged recall" in (out / "results.md").read_text()

    # the RL policy through the generation API, masked by the rules it carries
    assert_pages_follow_the_rules(data, out / "model", temperature=1.0)


def test_wbc_and_the_comparison_run_on_the_dataset_alone(stages, tmp_path):
    data, root = stages
    run("wbc.py", f"data_dir={data}", f"pretrained_dir={root / 'pt' / 'model'}", f"out_dir={tmp_path / 'wbc'}", *TINY_WBC)
    w = summary(tmp_path / "wbc")
    assert w["weighted_bce_wbc"] < w["weighted_bce_pretrained"] and 0 <= w["entity_auc_wbc"] <= 1
    assert not [k for k in w if k.startswith("true_reward")]
    run("compare.py", f"data_dir={data}", f"rm_dir={root / 'rm' / 'model'}", f"out_dir={tmp_path / 'compare'}",
        f"methods=[pretrained={root / 'pt' / 'model'},wbc={tmp_path / 'wbc'}/seed_*/model]", "eval_users=8",
        "eval_sequences=100", "eval_backend=hf", "max_new_tokens=56", "num_threads=1")
    c = summary(tmp_path / "compare")
    assert c["logging"]["true_reward"] is None
    assert sorted(c["rankings"]) == ["entity_auc"]  # no truth: no page-level ranking
    for method in ("pretrained", "wbc"):
        for mode in ("masked_greedy", "masked_sampled"):
            figures = c["methods"][method][mode]
            assert figures["true_reward"]["mean"] is None and figures["violations"]["per_seed"] == [0]
            assert figures["rm_reward"]["mean"] is not None and "true_reward_gain" not in figures
    assert c["methods"]["wbc"]["entity_auc"]["mean"] == pytest.approx(w["entity_auc_wbc"], abs=1e-6)

    # The WBC policy through the generation API, greedy (its highest value at each step) under its rules' masks
    assert_pages_follow_the_rules(data, tmp_path / "wbc" / "model", temperature=0.0)


def test_training_on_the_truth_needs_an_environment(stages, tmp_path):
    data, root = stages
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "dr_grpo.py"), f"data_dir={data}",
                           f"policy_dir={root / 'pt' / 'model'}", f"rm_dir={root / 'rm' / 'model'}",
                           f"out_dir={tmp_path / 'rl'}", "reward_source=environment", "credit=page"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no environment" in proc.stderr and "environment=module:Class" in proc.stderr
    assert not (tmp_path / "rl").exists()  # refused before anything is written


def test_iterated_rounds_refuse_a_truth_only_environment_before_round_one(stages, tmp_path):
    """A plugged environment that can judge pages but not serve them (no sample_contexts / log_impressions) cannot
    run a round; recipes/iterate.py says so, and what to do, before it trains or writes anything."""
    data, root = stages
    out = tmp_path / "iterate"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "iterate.py"), f"data_dir={data}",
                           "environment=tests.datasets.music:FamilySafeShare", f"pretrained_dir={root / 'pt' / 'model'}",
                           f"rm_dir={root / 'rm' / 'model'}", f"first_round_dir={tmp_path / 'round1'}", f"out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "FamilySafeShare has no sample_contexts or log_impressions" in proc.stderr, proc.stderr[-2000:]
    assert "refresh_rm=false" in proc.stderr
    assert not out.exists() and not (tmp_path / "round1").exists()
