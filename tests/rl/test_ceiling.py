"""Best-of-n (rl/ceiling.py) against a brute-force mean over every n-subset of each request's samples."""

import itertools

import numpy as np
import pytest

from rl.ceiling import best_of_n, curves, within_request_pearson


def brute_force(selector, value, n):
    per_request = []
    for s, v in zip(selector, value):
        picks = [v[max(subset, key=lambda i: s[i])] for subset in itertools.combinations(range(len(s)), n)]
        per_request.append(np.mean(picks))
    return np.mean(per_request)


def test_best_of_n_equals_the_mean_over_every_subset():
    rng = np.random.default_rng(0)
    selector, value = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    got = best_of_n(selector, value, [1, 2, 3, 7])
    np.testing.assert_allclose(got, [brute_force(selector, value, n) for n in (1, 2, 3, 7)])
    assert got[0] == pytest.approx(value.mean())  # n = 1: a random sample
    assert got[-1] == pytest.approx(value[np.arange(4), selector.argmax(1)].mean())  # n = N: the selector's top
    # Picking by the value itself never gets worse with n.
    assert np.all(np.diff(best_of_n(value, value, range(1, 8))) >= 0)
    with pytest.raises(ValueError, match="outside 1..7"):
        best_of_n(selector, value, [8])


def test_curves_and_within_request_correlation_by_hand():
    # One request, 3 pages: the RM ranks them 1 < 2 < 3, the truth 3 > 1 > 2 (the RM's favourite is worth 1).
    rm, true = np.array([[1.0, 2.0, 3.0]]), np.array([[2.0, 0.0, 1.0]])
    c = curves({"rm": rm, "true": true}, [1, 3])
    assert c["rm_pick_true"] == pytest.approx([1.0, 1.0]) and c["rm_pick_rm"] == pytest.approx([2.0, 3.0])
    assert c["true_pick_true"] == pytest.approx([1.0, 2.0])
    assert c["rm_true_pearson_within_request"] == pytest.approx(-0.5)
    assert within_request_pearson(np.ones((1, 3)), true) != within_request_pearson(np.ones((1, 3)), true)  # NaN
