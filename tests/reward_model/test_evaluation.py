import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_model.evaluation import (BagOfEntitiesRidge, EvalSet, binomial_se, evaluate, pairwise_accuracy, pearson, ranks,
                                     results_table, spearman)
from tests.toy import toy_tokenizer

ENTITIES = ["movie_0000", "show_0001", "game_0002", "movie_0003"]
TOK = toy_tokenizer(ENTITIES)


def test_ranks_average_ties_like_scipy():
    # sorted: 5 (rank 1), 10 (rank 2), 20, 20 (ranks 3 and 4 -> 3.5 each)
    np.testing.assert_array_equal(ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])


def test_pearson_and_spearman_hand_worked():
    x = np.array([1.0, 2.0, 3.0])
    # y = 2x + 1 exactly: r = 1; y reversed: r = -1
    assert abs(pearson(x, 2 * x + 1) - 1) < 1e-12 and abs(pearson(x, -x) + 1) < 1e-12
    # x = (1,2,3), y = (1,3,2): deviations (-1,0,1), (-1,1,0); r = 1 / sqrt(2 * 2) = 0.5
    assert abs(pearson(x, np.array([1.0, 3.0, 2.0])) - 0.5) < 1e-12
    # a monotone but nonlinear relation: Spearman 1, Pearson below 1
    y = np.exp(np.array([1.0, 2.0, 3.0, 4.0]) * 3)
    assert spearman(np.arange(4), y) == 1.0 and pearson(np.arange(4), y) < 0.95
    assert pearson(x, np.ones(3)) == 0.0  # a constant predictor


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-100, 100), min_size=3, max_size=30))
def test_spearman_invariant_under_monotone_maps(values):
    x = np.array(values, dtype=float)
    other = np.arange(len(x), dtype=float)[::-1]
    assert abs(spearman(x, other) - spearman(x ** 3 + 2 * x, other)) < 1e-9  # strictly increasing, exact on integers
    assert ranks(x).sum() == len(x) * (len(x) + 1) / 2


def test_pairwise_accuracy_skips_ground_truth_ties_and_halves_predicted_ties():
    pred_a, pred_b = np.array([1.0, 2.0, 3.0, 0.0, 4.0]), np.array([0.0, 3.0, 1.0, 1.0, 4.0])
    true_a, true_b = np.array([5.0, 1.0, 2.0, 7.0, 1.0]), np.array([4.0, 2.0, 2.0, 6.0, 0.0])
    # pair 0 agrees (+,+), pair 1 agrees (-,-), pair 2 is a true tie (left out), pair 3 disagrees (-,+),
    # pair 4 is a predicted tie (half): (1 + 1 + 0 + 0.5) / 4
    acc, n = pairwise_accuracy(pred_a, pred_b, true_a, true_b)
    assert (acc, n) == (0.625, 4)


def test_ridge_recovers_a_linear_page_reward():
    ent = [TOK.vocab[f"ent:{e}"] for e in ENTITIES]
    row = TOK.vocab["row:trending_now"]
    rng = np.random.default_rng(0)
    pages = [[row] + rng.choice(ent, size=rng.integers(1, 4)).tolist() + [TOK.eop_id] for _ in range(200)]
    prompts = [[TOK.bos_id, TOK.page_id]] * 200
    # reward = 2 per movie_0000 - 1 per game_0002 + 3
    y = np.array([2.0 * p.count(ent[0]) - p.count(ent[2]) + 3 for p in pages])
    ridge = BagOfEntitiesRidge(TOK, ridge_lambda=1e-6).fit(prompts, pages, y)
    np.testing.assert_allclose(ridge.predict(prompts, pages), y, atol=1e-4)
    # the context's tokens are features too, the [EOP] and row-token counts of the page are not double counted
    assert ridge.features(prompts[:1], pages[:1])[0, TOK.eop_id] == 0


def test_evaluate_a_perfect_scorer_on_ground_truth():
    prompts = [[TOK.bos_id, TOK.page_id]] * 4
    pages = [[TOK.vocab["row:trending_now"], TOK.vocab[f"ent:{e}"], TOK.eop_id] for e in ENTITIES]
    true = np.array([1.0, 2.0, 3.0, 4.0])
    table = {tuple(p): t for p, t in zip(pages, true)}
    es = EvalSet(prompts, pages, observed=true + np.array([0.5, -0.5, 0.5, -0.5]), true=true,
                 pair_a=np.array([0, 1]), pair_b=np.array([3, 2]), true_b=np.array([4.0, 3.0]),
                 gen_prompts=prompts, gen_pages=pages, true_gen=true)
    m = evaluate(lambda p, g: np.array([table[tuple(x)] for x in g]), es)
    assert m["mse"] == 0.25 and m["gt_pearson_logged"] == 1.0
    assert m["gt_pairwise_acc_logged"] == 1.0 and m["gt_pairs_logged"] == 2
    assert m["gt_pairwise_acc_generated"] == 1.0 and m["gt_pairs_generated"] == 2
    assert "| GT pairwise acc., logged pages | 1.000 |" in results_table(m)
    assert m["gt_pairwise_acc_logged_se"] == 0.0 and "logged pages +-0.000 (2 pairs)" in results_table(m)
    offline = {k: v for k, v in m.items() if not k.startswith("gt_")}  # no environment: no ground-truth rows
    assert "| MSE vs observed" in results_table(offline) and "GT " not in results_table(offline)


def test_binomial_standard_error_of_a_pairwise_accuracy():
    assert binomial_se(0.75, 1875) == pytest.approx(0.01)
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert np.isnan(binomial_se(0.5, 0))


def test_the_ridge_by_conjugate_gradients_is_the_closed_form_solution():
    """The sparse solver (what a 20,000-title catalog needs) against the closed form on the same data."""
    ent = [TOK.vocab[f"ent:{e}"] for e in ENTITIES]
    rng = np.random.default_rng(1)
    pages = [[TOK.vocab["row:trending_now"]] + rng.choice(ent, size=rng.integers(1, 5)).tolist() + [TOK.eop_id]
             for _ in range(300)]
    prompts = [[TOK.bos_id] + rng.choice(ent, size=3).tolist() + [TOK.page_id] for _ in range(300)]
    y = rng.normal(size=300) + np.array([p.count(ent[1]) for p in pages])
    exact = BagOfEntitiesRidge(TOK, ridge_lambda=0.5).fit(prompts, pages, y)
    sparse = BagOfEntitiesRidge(TOK, ridge_lambda=0.5, dense_cells=0).fit(prompts, pages, y)
    assert exact.solver["method"] == "closed_form" and sparse.solver["method"] == "conjugate_gradient"
    assert sparse.solver["relative_residual"] < 1e-9
    np.testing.assert_allclose(sparse.w, exact.w, atol=1e-7)
    np.testing.assert_allclose(sparse.predict(prompts, pages), exact.features(prompts, pages) @ exact.w, atol=1e-7)
