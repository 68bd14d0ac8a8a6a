"""The training side of each registered reward-model head: initialization, the targets it needs, its extra loss."""

import math

import numpy as np
import pytest
import torch

from policies.reward_heads import REWARD_READOUTS, RewardReadout
from reward_model.data import EntityTargets, RewardNormalization
from reward_model.heads import (DEFAULT_REWARD_HEAD, REWARD_HEADS, LastTokenHead, get_reward_head,
                                register_reward_head)

nan = float("nan")
# one impression: a row token, two titles, [EOP]; feedback types (none, play) with rewards (0, 2), thumbs-up 1
TARGETS = EntityTargets(reward=[np.array([nan, 0.0, 4.0, nan], np.float32)],
                        feedback=[np.array([nan, 0.0, 1.0, nan], np.float32)],
                        thumbs=[np.array([nan, 0.0, 1.0, nan], np.float32)],
                        feedback_rewards=[0.0, 2.0], thumbs_up_reward=1.0, feedback_counts=[3, 1], thumbs_up_count=1)
NORM = RewardNormalization(mean=6.0, std=2.0)


def test_every_head_has_its_read_out_and_the_default_is_entity_feedback():
    assert REWARD_HEADS.names() == REWARD_READOUTS.names() == ("entity_feedback", "entity_sum", "last")
    assert DEFAULT_REWARD_HEAD == "entity_feedback" and get_reward_head(DEFAULT_REWARD_HEAD).name == "entity_feedback"


def test_an_unknown_head_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward_head 'scalar'; known: \['entity_feedback', 'entity_sum', 'last'\]"):
        get_reward_head("scalar")
    with pytest.raises(ValueError, match="has no read-out: register it in policies.reward_heads"):
        register_reward_head("scalar")(LastTokenHead)
    with pytest.raises(ValueError, match="registered twice"):
        register_reward_head("last")(LastTokenHead)


def test_which_heads_need_the_logged_outcome_of_each_title():
    assert get_reward_head("entity_feedback").needs_entity_targets(0.0)  # its reward system comes from the logs
    assert not get_reward_head("entity_sum").needs_entity_targets(0.0)
    assert get_reward_head("entity_sum").needs_entity_targets(1.0)
    assert not get_reward_head("last").needs_entity_targets(1.0)


def test_entity_feedback_head_starts_at_the_logged_base_rates_and_takes_the_reward_system():
    head = get_reward_head("entity_feedback")
    assert head.config_fields(TARGETS) == {"feedback_rewards": [0.0, 2.0], "thumbs_up_reward": 1.0}
    with pytest.raises(ValueError, match="needs the logged feedback"):
        head.config_fields(None)
    score = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.init_score(score, NORM, TARGETS, mean_page_tokens=4.0)
    # 3 of 4 titles "none", 1 "play"; 1 of 4 with a thumbs-up
    torch.testing.assert_close(torch.softmax(score.bias[:2], 0), torch.tensor([0.75, 0.25]))
    assert torch.sigmoid(score.bias[2]).item() == pytest.approx(0.25, abs=1e-6)


def test_entity_sum_head_starts_at_the_mean_reward_per_page_token():
    head, score = get_reward_head("entity_sum"), torch.nn.Linear(4, 1)
    assert head.config_fields(None) == {}
    with torch.no_grad():
        head.init_score(score, NORM, None, mean_page_tokens=4.0)
    assert score.bias.item() == pytest.approx(1.5)  # mean 6 over 4 tokens
    with torch.no_grad():
        head.init_score(score, NORM, None, mean_page_tokens=0.5)
    assert score.bias.item() == pytest.approx(6.0)  # at least one token


def test_last_head_keeps_its_initialization_and_has_no_extra_loss():
    head, score = get_reward_head("last"), torch.nn.Linear(4, 1)
    before = score.bias.clone()
    with torch.no_grad():
        head.init_score(score, NORM, None, mean_page_tokens=4.0)
    assert torch.equal(score.bias, before) and head.config_fields(None) == {} and head.entity_loss(TARGETS) is None


def test_entity_sum_loss_by_hand():
    loss_fn = get_reward_head("entity_sum").entity_loss(TARGETS)
    # prompt of one token, the page at positions 1..4, T = 6; each page token predicts reward 2
    out = RewardReadout(torch.zeros(1, 1), token_rewards=torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 0.0]]))
    loss, n, metrics = loss_fn(out, [0], [[7]], 6)
    # titles at 2, 3 with rewards 0, 4 (std 2): errors (2 - 0) / 2 = 1 and (2 - 4) / 2 = -1 -> MSE 1 over 2 titles
    assert loss.item() == pytest.approx(1.0) and n == 2 and metrics == {"rm/train_entity_loss": pytest.approx(1.0)}


def test_entity_feedback_loss_by_hand():
    loss_fn = get_reward_head("entity_feedback").entity_loss(TARGETS)
    logits = torch.zeros(1, 6, 3)  # each feedback type 1/2, thumbs-up 1/2
    logits[0, 0] = 100.0  # the prompt's prediction does not count
    loss, n, metrics = loss_fn(RewardReadout(torch.zeros(1, 1), feedback_logits=logits), [0], [[7]], 6)
    # titles at 2, 3: cross-entropy log 2 each, binary cross-entropy log 2 each: mean CE + mean BCE = 2 log 2
    assert loss.item() == pytest.approx(2 * math.log(2.0), rel=1e-6) and n == 2
    assert metrics == {"rm/train_feedback_nll": pytest.approx(2 * math.log(2.0), rel=1e-6)}


def test_the_config_accepts_exactly_the_registered_heads():
    import typing

    from reward_model.config import RewardHeadName, RewardModelConfig

    assert set(typing.get_args(RewardHeadName)) == set(REWARD_HEADS.names())
    assert RewardModelConfig().reward_head == DEFAULT_REWARD_HEAD
