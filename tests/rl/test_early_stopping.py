"""Early stopping on the validator reward model: the decision by hand, and its history across a resume."""

import numpy as np
import pytest

from rl.early_stopping import EarlyStopState, moving_average, should_stop


def test_moving_average_by_hand():
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, 3.0, 6.0]), 2), [1.5, 2.5, 4.5])
    assert moving_average(np.array([1.0]), 2).shape == (0,)


def test_stops_only_when_the_smoothed_validator_has_had_no_new_best_for_patience_steps():
    rising = {s: float(s) for s in range(1, 11)}
    assert not should_stop(rising, patience=3, window=2)
    # rises to step 5, then flat below its peak: the moving average (window 1) peaks at step 5
    plateau = {s: (float(s) if s <= 5 else 4.0) for s in range(1, 9)}  # steps 6, 7, 8: no new best
    assert should_stop(plateau, patience=3, window=1)
    assert not should_stop({s: plateau[s] for s in range(1, 8)}, patience=3, window=1)  # only 2 steps since the best
    assert not should_stop(plateau, patience=0, window=1)  # off
    # one noisy spike does not end a run when the window smooths it away
    spiky = {s: float(s) for s in range(1, 9)}
    spiky[3] = 100.0
    assert should_stop(spiky, patience=3, window=1)
    assert not should_stop(spiky, patience=3, window=4)


def test_state_survives_a_resume_that_replays_steps(tmp_path):
    state = EarlyStopState.load(tmp_path)
    for step, v in enumerate([1.0, 2.0, 3.0, 2.0, 2.0], start=1):
        assert not state.record(step, v, patience=3, window=1)
    # killed after step 5; resumed from a checkpoint at step 3: steps 4 and 5 are replayed with new values
    resumed = EarlyStopState.load(tmp_path)
    assert sorted(resumed.history) == [1, 2, 3, 4, 5]
    assert not resumed.record(4, 3.5, patience=3, window=1)
    assert sorted(resumed.history) == [1, 2, 3, 4]  # the old step 5 is forgotten
    for step in (5, 6):
        assert not resumed.record(step, 3.0, patience=3, window=1)
    assert resumed.record(7, 3.0, patience=3, window=1)  # best at step 4, three steps without a new one
    assert resumed.stopped_at == 8  # verl's next step is the last
    again = EarlyStopState.load(tmp_path)
    assert again.stopped_at == 8 and not again.record(8, 9.0, patience=3, window=1)  # a decision is final


def test_config_needs_a_validator_that_is_not_trained_on():
    from rl.config import DrGrpoConfig

    with pytest.raises(ValueError, match="set validator_rm_dir"):
        DrGrpoConfig(early_stop_patience=5)
    with pytest.raises(ValueError, match="not trained on"):
        DrGrpoConfig(validator_rm_dir="runs/rm/model")
    with pytest.raises(ValueError, match="not trained on"):
        DrGrpoConfig(rm_ensemble=("runs/rm_1/model",), validator_rm_dir="runs/rm_1/model")
    cfg = DrGrpoConfig(rm_ensemble=("runs/rm_1/model",), validator_rm_dir="runs/rm_2/model", early_stop_patience=5)
    assert cfg.early_stop_window == 5
