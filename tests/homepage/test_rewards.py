import numpy as np
import pytest

from homepage.rewards import (ABANDON, BINGE, FEEDBACK_INDEX, FEEDBACK_TYPES, LONG_PLAY, NONE, SHORT_PLAY, RewardConfig,
                              entity_rewards, page_reward)


def test_reward_ordering_binge_long_short_none_abandon():
    cfg = RewardConfig()
    codes = np.array([BINGE, LONG_PLAY, SHORT_PLAY, NONE, ABANDON])
    r = entity_rewards(codes, np.zeros(5, dtype=bool), cfg)
    assert list(r) == sorted(r, reverse=True)
    assert r[3] == 0.0 and r[4] < 0.0 < r[2] < r[1] < r[0]


def test_thumbs_up_adds_bonus_and_page_reward_is_sum():
    cfg = RewardConfig(thumbs_up=0.5)
    fb = np.array([[LONG_PLAY, NONE, ABANDON]])
    thumbs = np.array([[True, False, False]])
    r = entity_rewards(fb, thumbs, cfg)
    # long 2.0 + thumbs 0.5, none 0, abandon -1.0 -> page 1.5
    np.testing.assert_allclose(r, [[2.5, 0.0, -1.0]])
    np.testing.assert_allclose(page_reward(r), [1.5])


def test_misordered_reward_config_is_rejected_with_fix():
    with pytest.raises(ValueError, match="binge > long_play"):
        RewardConfig(short_play=3.0)
    with pytest.raises(ValueError, match="thumbs_up"):
        RewardConfig(thumbs_up=-1)


def test_each_feedback_code_indexes_the_reward_of_its_name():
    """The logs store feedback names; the simulator and `feedback_values` use codes (positions in FEEDBACK_TYPES):
    a reordered FEEDBACK_TYPES, code constants or value table would pay one feedback type another's reward."""
    cfg = RewardConfig(binge=5.0, long_play=3.0, short_play=1.0, abandon=-2.0)
    by_name = {"none": 0.0, "abandon": -2.0, "short_play": 1.0, "long_play": 3.0, "binge": 5.0}  # the config above
    assert set(FEEDBACK_TYPES) == set(by_name)
    codes = np.array([FEEDBACK_INDEX[name] for name in by_name])
    np.testing.assert_array_equal(cfg.feedback_values()[codes], list(by_name.values()))
    np.testing.assert_array_equal(entity_rewards(codes, np.zeros(5, dtype=bool), cfg), list(by_name.values()))
    assert [FEEDBACK_TYPES[c] for c in (NONE, ABANDON, SHORT_PLAY, LONG_PLAY, BINGE)] == list(by_name)
