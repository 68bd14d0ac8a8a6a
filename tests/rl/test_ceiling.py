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


def test_greedy_page_obeys_the_masks_and_never_lowers_the_true_reward(small_world, tmp_path):
    from homepage.pages import Page
    from homepage.world import SimulatorEnvironment, world_contexts
    from policies.evaluation import pages_from_tokens
    from policies.rules import build_ruleset
    from rl.ceiling import greedy_page
    from tests.toy import world_dataset, world_tokenizer

    dataset = world_dataset(small_world, tmp_path / "data")
    tok, env = world_tokenizer(small_world), SimulatorEnvironment(dataset)
    rules = build_ruleset(tok, dataset)
    user = np.arange(3)
    req = small_world.sample_requests(np.random.default_rng(0), user)
    contexts = world_contexts(small_world, user, req)
    logging = small_world.true_page_reward(user, req, small_world.logging_policy.act(user, req, np.random.default_rng(1)))
    for context, logged in zip(contexts, logging):
        prompt = tok.encode_context(context)
        ids, trace = greedy_page(env, rules, tok, context, prompt)
        assert ids[-1] == tok.eop_id and rules.violations([prompt], [ids])["total"].sum() == 0
        values = [v for v, _ in trace]
        # every step the masks did not force raises the true reward; the page is worth its last step's value
        assert all(b > a for (a, _), (b, forced) in zip([(env.true_page_reward([context], [Page(())])[0], False)] + trace,
                                                         trace) if not forced)
        page = pages_from_tokens(tok, [ids])[0][0]
        assert env.true_page_reward([context], [page])[0] == pytest.approx(values[-1])
        assert values[-1] > logged  # it knows the user's hidden tastes; the logging policy does not
