import numpy as np
import pytest

from homepage.rewards import ABANDON, BINGE, FEEDBACK_TYPES, LONG_PLAY, NONE, SHORT_PLAY, RewardConfig, entity_rewards, page_reward


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


def test_feedback_codes_are_stable():
    # The log schema stores names, but code order is used by the simulator; appending only.
    assert FEEDBACK_TYPES[:5] == ("none", "abandon", "short_play", "long_play", "binge")
