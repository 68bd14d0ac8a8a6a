"""The world has the page-level interactions the issue asks for, and ground truth matches sampling."""

import numpy as np

from homepage.catalog import ROW_IDS, genre_row_id
from homepage.pages import PageBatch
from homepage.users import Requests
from homepage.world import World


def one_request(hour=20, dow=2, device=0) -> Requests:
    return Requests(np.array([hour], np.int8), np.array([dow], np.int8), np.array([device], np.int8))


def page(rows: list[tuple[str, list[int]]], L: int = 8) -> PageBatch:
    r = np.full((1, len(rows)), -1, np.int64)
    e = np.full((1, len(rows), L), -1, np.int64)
    for i, (row_id, ents) in enumerate(rows):
        r[0, i] = ROW_IDS.index(row_id)
        e[0, i, : len(ents)] = ents
    return PageBatch(r, e)


def orthonormal(n: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:n].astype(np.float32)


def neutralize(world: World, user: int, entities: np.ndarray) -> None:
    """Makes `entities` equally liked by `user`: same hidden factors, quality, popularity, language;
    not new, not watched. Content embeddings are left for the test to set."""
    c, u = world.catalog, world.users
    c.latent[entities] = c.latent[entities[0]]
    c.quality[entities] = 0.5
    c.popularity[entities] = 1.0
    c.language[entities] = u.language[user]
    c.release_day[entities] = -1000
    c.maturity[entities] = 0
    u.resume[user, entities] = False
    u.completed[user, entities] = False
    u.profile_type[user] = 0


def equal_distinct_titles(world, user: int, ents: np.ndarray) -> None:
    """`ents` equally liked by `user` and mutually orthogonal in content (no satiation between them)."""
    neutralize(world, user, ents)
    world.catalog.content_emb[ents] = orthonormal(len(ents), world.catalog.content_emb.shape[1])


def test_near_duplicates_score_lower_than_diverse_page_of_equally_liked_titles(controlled_world):
    w = controlled_world
    user = 0
    dupes, diverse = np.arange(0, 6), np.arange(6, 12)
    neutralize(w, user, np.concatenate([dupes, diverse]))
    d = w.catalog.content_emb.shape[1]
    w.catalog.content_emb[diverse] = orthonormal(6, d)
    base = orthonormal(1, d, seed=1)[0]
    w.catalog.content_emb[dupes] = base  # near-duplicates (cosine 1)
    row = genre_row_id("comedy")
    req = one_request()
    v_dupes = w.true_page_reward(np.array([user]), req, page([(row, list(dupes))]))[0]
    v_diverse = w.true_page_reward(np.array([user]), req, page([(row, list(diverse))]))[0]
    # Equal stand-alone appeal: the first slot is worth the same on both pages.
    first = lambda ents: w.behavior.expected_entity_reward(np.array([user]), req, page([(row, ents)]))[0, 0, 0]
    np.testing.assert_allclose(first(list(dupes)), first(list(diverse)), rtol=1e-9)
    assert v_dupes < 0.8 * v_diverse, (v_dupes, v_diverse)


def test_stopping_row_lowers_value_of_rows_below(controlled_world):
    w = controlled_world
    user = 1
    top_hot, top_cold, below = np.arange(0, 6), np.arange(6, 12), np.arange(12, 18)
    neutralize(w, user, np.concatenate([top_hot, top_cold, below]))
    d = w.catalog.content_emb.shape[1]
    w.catalog.content_emb[:16] = orthonormal(16, d)
    w.catalog.content_emb[16:18] = orthonormal(2, d, seed=5)
    # Hot titles: strongly matching the user's taste; cold: strongly mismatched.
    w.catalog.latent[top_hot] = w.users.taste[user] / np.linalg.norm(w.users.taste[user]) * 4.0
    w.catalog.latent[top_cold] = -w.users.taste[user] / np.linalg.norm(w.users.taste[user]) * 4.0
    row = genre_row_id("drama")
    req = one_request()
    er_hot = w.behavior.expected_entity_reward(np.array([user]), req, page([(row, list(top_hot)), (row, list(below))]))
    er_cold = w.behavior.expected_entity_reward(np.array([user]), req, page([(row, list(top_cold)), (row, list(below))]))
    assert er_hot[0, 0].sum() > er_cold[0, 0].sum()  # the hot row itself is worth more
    assert er_hot[0, 1].sum() < 0.9 * er_cold[0, 1].sum()  # ... and it stops browsing: the row below loses
    pr = w.behavior.probabilities(np.array([user]), req, page([(row, list(top_hot)), (row, list(below))]))
    assert pr.reach[0, 1] < 1.0


def test_position_bias_within_a_row(controlled_world):
    w = controlled_world
    user = 2
    ents = np.arange(20, 26)
    equal_distinct_titles(w, user, ents)
    pr = w.behavior.probabilities(np.array([user]), one_request(), page([(genre_row_id("action"), list(ents))]))
    assert np.all(np.diff(pr.engage[0, 0, :6]) < 0)  # equal titles: strictly less attention to the right


def test_sampled_feedback_matches_exact_expectation(small_world):
    w = small_world
    rng = np.random.default_rng(0)
    batch = next(w.iter_logs(64, seed=5))
    n_rep = 400
    idx = np.repeat(np.arange(64), n_rep)
    user, req, pages = batch.user[idx], batch.requests.take(idx), batch.pages.take(idx)
    sampled = w.simulate(user, req, pages, rng).page_reward.reshape(64, n_rep)
    exact = w.true_page_reward(batch.user, batch.requests, batch.pages)
    se = sampled.std(1).mean() / np.sqrt(n_rep)
    # Mean over 64 pages: the exact mean lies within 5 standard errors of the Monte Carlo mean.
    assert abs(sampled.mean() - exact.mean()) < 5 * se / np.sqrt(64) + 1e-3
    # Page by page the correlation is near 1 once noise is averaged.
    assert np.corrcoef(sampled.mean(1), exact)[0, 1] > 0.95


def test_kids_profile_with_mature_title_is_worse(controlled_world):
    w = controlled_world
    user = 3
    ents = np.arange(30, 36)
    equal_distinct_titles(w, user, ents)
    req = one_request(hour=15)
    p = page([(genre_row_id("family"), list(ents))])
    safe = w.true_page_reward(np.array([user]), req, p)[0]
    w.users.profile_type[user] = 1
    w.catalog.maturity[ents] = 2
    assert w.true_page_reward(np.array([user]), req, p)[0] < 0.2 * safe
