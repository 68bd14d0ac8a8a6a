"""Reading a run back: metrics of resumed attempts, verl's per-page validation dumps, the table."""

import json

import numpy as np
import pytest

from rl.config import RunPaths
from rl.evaluation import policy_row, read_metrics, read_validation, results_table


def test_resumed_attempts_override_repeated_steps(tmp_path):
    paths = RunPaths(tmp_path, seed=0)
    paths.metrics.mkdir(parents=True)
    # Attempt 0 logged steps 1-3 and died; attempt 1 resumed from the step-2 checkpoint and redid step 3.
    (paths.metrics / "attempt_0.jsonl").write_text("\n".join(json.dumps({"step": s, "data": {"x": s, "a": 0}}) for s in (1, 2, 3)))
    (paths.metrics / "attempt_1.jsonl").write_text("\n".join(json.dumps({"step": s, "data": {"x": 10 * s}}) for s in (3, 4)))
    steps = read_metrics(paths)
    assert {s: d["x"] for s, d in steps.items()} == {1: 1, 2: 2, 3: 30, 4: 40}
    assert steps[3]["a"] == 0  # keys only the first attempt logged are kept


def test_validation_dump_to_table_row(tmp_path):
    rows = [
        {"output": "row:genre_comedy ent:movie_0001 ent:movie_0002 ent:<unk_movie> [EOP]", "score": 1.0, "rm_reward": 1.0,
         "format_reward": 0.0, "true_reward": 2.0, "diversity": 0.5, "n_entities": 2.0, "violations/total": 0.0},
        {"output": "row:genre_drama ent:movie_0002 ent:movie_0003 [EOP]", "score": 3.0, "rm_reward": 3.0,
         "format_reward": 0.0, "true_reward": 4.0, "diversity": 0.7, "n_entities": 2.0, "violations/total": 1.0},
    ]
    path = tmp_path / "0.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    row = policy_row(read_validation(path), n_entities=10)
    assert row["true_reward"] == 3.0 and row["rm_reward"] == 2.0 and np.isclose(row["diversity"], 0.6)
    assert row["coverage"] == 0.3  # movie_0001..0003 of 10 titles; the fallback token is not a title
    assert row["mask_violations"] == 1 and row["mask_violations_per_page"] == 0.5
    table = results_table({"logging": row, "pretrained": row, "rl": {**row, "true_reward": 3.3}}, [0], 2)
    assert "| rl | 3.300 |" in table and table.strip().endswith("| 1.100 |")
    # Without an environment the true reward is NaN: no such column, and the ratio is on the RM reward.
    offline = {**row, "true_reward": float("nan")}
    table = results_table({"logging": offline, "pretrained": offline, "rl": {**offline, "rm_reward": 3.0}}, [0], 2)
    assert "true reward" not in table and "rm reward vs pretrained" in table and table.strip().endswith("| 1.500 |")


def test_per_step_gaps_average_the_seeds_that_ran_each_step():
    from rl import page_metrics as pm
    from rl.evaluation import per_step_gaps

    per_seed = {0: {1: {pm.RM_TRUTH_GAP: 0.2, pm.RM_REWARD: 4.0}, 2: {pm.RM_TRUTH_GAP: 0.4, pm.RM_REWARD: 5.0}},
                1: {1: {pm.RM_TRUTH_GAP: 0.4, pm.RM_REWARD: 6.0}, 0: {"val-aux/x": 1.0}}}  # seed 1 stopped after step 1
    rows = per_step_gaps(per_seed)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0][pm.RM_TRUTH_GAP] == pytest.approx(0.3) and rows[0][pm.RM_REWARD] == pytest.approx(5.0)
    assert rows[1] == {"step": 2, pm.RM_TRUTH_GAP: 0.4, pm.RM_REWARD: 5.0}
