"""WBC's pieces (policies/wbc.py) against hand-worked values: labels and weights, the weighted BCE, the value
read-out, and the sample-weighted AUC against a brute-force pair count."""

import math

import numpy as np
import pytest
import torch

from policies.wbc import NO_TARGET, token_targets, token_values, weighted_auc, weighted_bce


def test_labels_and_weights_of_a_page_by_hand():
    # Row 1: titles rewarded 2.5 (long play + thumbs up) and 0 (shown, not played): row reward 2.5.
    # Row 2: titles -1 (abandon) and 0: row reward -1.
    label, weight, is_row = token_targets([[2.5, 0.0], [-1.0, 0.0]], "negative", zero_weight=0.5)
    #                       row1 t   t    row2 t    t    [EOP]
    assert label.tolist() == [1, 1, 0, 0, 0, 0, NO_TARGET]
    assert weight.tolist() == [2.5, 2.5, 0.5, 1.0, 1.0, 0.5, 0.0]
    assert is_row.tolist() == [True, False, False, True, False, False, False]
    label, weight, _ = token_targets([[2.5, 0.0], [0.0, 0.0]], "ignore", zero_weight=0.5)
    assert label.tolist() == [1, 1, 0, 0, 0, 0, NO_TARGET]
    assert weight.tolist() == [2.5, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0]  # a row with nothing played is ignored too
    with pytest.raises(ValueError, match="zero_reward must be one of"):
        token_targets([[1.0]], "skip")


def test_weighted_bce_by_hand():
    values = torch.tensor([0.0, 2.0, -1.0])
    label = torch.tensor([1.0, 0.0, NO_TARGET])
    weight = torch.tensor([2.0, 0.5, 0.0])
    total, w = weighted_bce(values, label, weight)
    # -2 log sigmoid(0) - 0.5 log(1 - sigmoid(2)) = 2 log 2 + 0.5 log(1 + e^2); the third weighs nothing
    assert total.item() == pytest.approx(2 * math.log(2) + 0.5 * math.log(1 + math.e ** 2), rel=1e-6)
    assert w.item() == 2.5


def test_token_values_read_the_logit_of_each_written_token_at_its_position():
    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            B, T = input_ids.shape
            logits = torch.arange(B * T * 5, dtype=torch.float32).view(B, T, 5)
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[1, 3, 4], [2, 0, 1]])
    values = token_values(Fixed(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    logits = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    expected = [[0, logits[0, 0, 3], logits[0, 1, 4]], [0, logits[1, 0, 0], logits[1, 1, 1]]]
    assert values.tolist() == torch.tensor(expected).tolist()


def brute_force_auc(s, y, w):
    num = den = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if y[i] == 1 and y[j] == 0:
                num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
                den += w[i] * w[j]
    return num / den


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_equals_the_brute_force_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = 60
    s = rng.integers(0, 8, n).astype(float)  # many ties
    y = rng.integers(0, 2, n)
    w = rng.uniform(0, 3, n) * (rng.random(n) > 0.2)  # some weigh nothing
    assert weighted_auc(s, y, w) == pytest.approx(brute_force_auc(s, y, w), rel=1e-12)
    assert weighted_auc(s, y, np.ones(n)) == pytest.approx(brute_force_auc(s, y, np.ones(n)), rel=1e-12)
    assert weighted_auc(-s, y, w) == pytest.approx(1 - weighted_auc(s, y, w), rel=1e-12)
    assert math.isnan(weighted_auc(s, np.ones(n), w))
