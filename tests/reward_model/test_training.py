"""The weight average the reward-model trainer evaluates and saves."""

import math

import pytest
import torch

from reward_model.heads import feedback_nll
from reward_model.training import WeightAverage


def test_weight_average_by_hand_and_swap_restores_live_weights():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    avg = WeightAverage([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([2.0, 2.0]))
    avg.update(step=100)  # decay min(0.5, 101/110) = 0.5: avg = 0.5 * [0, 10] + 0.5 * [2, 2]
    torch.testing.assert_close(avg.avg[0], torch.tensor([1.0, 6.0]))
    avg.swap()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 6.0]))  # evaluated / saved: the average
    avg.swap()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, 2.0]))  # training continues on the live weights


def test_weight_average_warms_up_and_zero_decay_keeps_live_weights():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    avg = WeightAverage([p], decay=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    avg.update(step=0)  # decay min(0.999, 1/10) = 0.1: the first weights are forgotten fast
    assert avg.avg[0].item() == pytest.approx(0.9)
    off = WeightAverage([p], decay=0.0)
    with torch.no_grad():
        p.fill_(5.0)
    off.update(step=3)
    off.swap()
    assert p.item() == 5.0


def test_feedback_nll_by_hand_skips_tokens_without_feedback():
    nan = float("nan")
    logits = torch.zeros(1, 3, 6)  # every feedback type 1/5, thumbs-up 1/2
    logits[0, 1, 3] = math.log(4.0)  # token 1: long_play 4/8, the others 1/8
    feedback = torch.tensor([[nan, 3.0, 0.0]])  # token 0 is a row token
    thumbs = torch.tensor([[nan, 1.0, 0.0]])
    expected = (-math.log(4 / 8) - math.log(1 / 5)) / 2 + math.log(2.0)  # mean CE + mean BCE (both 1/2: log 2)
    assert feedback_nll(logits, feedback, thumbs).item() == pytest.approx(expected, rel=1e-6)
    logits[0, 0] = 100.0  # what the row token predicts does not count
    assert feedback_nll(logits, feedback, thumbs).item() == pytest.approx(expected, rel=1e-6)
