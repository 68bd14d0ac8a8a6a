import dataclasses

import numpy as np
import pytest

from homepage.catalog import CONTINUE_WATCHING, GENRES, KIDS, MATURITY, NEW_RELEASES, ROW_IDS, TRENDING, Catalog
from homepage.logs import batch_to_table
from homepage.config import WorldConfig
from homepage.world import World, batch_from_table
from tests.toy import SMALL


def test_generation_is_deterministic_under_a_seed(small_world):
    again = World.generate(SMALL)
    np.testing.assert_array_equal(again.catalog.content_emb, small_world.catalog.content_emb)
    np.testing.assert_array_equal(again.users.taste, small_world.users.taste)
    a = [batch_to_table(b, small_world) for b in small_world.iter_logs()]
    b = [batch_to_table(b, again) for b in again.iter_logs()]
    assert all(x.equals(y) for x, y in zip(a, b))
    other = World.generate(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert not np.array_equal(other.catalog.content_emb, small_world.catalog.content_emb)


def test_save_load_round_trip_keeps_ground_truth(small_world, tmp_path):
    small_world.save(tmp_path)
    loaded = World.load(tmp_path)
    assert loaded.config == small_world.config
    batch = next(small_world.iter_logs(100))
    np.testing.assert_array_equal(
        loaded.true_page_reward(batch.user, batch.requests, batch.pages),
        small_world.true_page_reward(batch.user, batch.requests, batch.pages),
    )


def test_load_missing_world_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_world.py"):
        World.load(tmp_path / "nope")


def test_catalog_has_the_required_kinds_of_titles(small_world):
    c = small_world.catalog
    assert set(np.unique(c.entity_type)) == {0, 1, 2}  # movies, shows, games
    assert c.is_new.any() and (~c.is_new).any()
    assert c.kids_safe.any() and (~c.kids_safe).any()
    assert c.trending.any()
    assert c.genres.any(0).all()  # every genre row can be filled
    np.testing.assert_allclose(np.linalg.norm(c.content_emb, axis=1), 1.0, rtol=1e-5)


def few_candidates_world(small_world) -> World:
    """The small world's logging policy filling rows from 30 of its 120 titles per request (candidate generation)."""
    policy = dataclasses.replace(small_world.config.logging_policy, candidates=30)
    return World(dataclasses.replace(small_world.config, logging_policy=policy), small_world.catalog, small_world.users)


@pytest.mark.parametrize("candidates", ["all", 30])
def test_logging_policy_pages_respect_row_categories_and_profiles(small_world, candidates):
    w = small_world if candidates == "all" else few_candidates_world(small_world)
    c, us = w.catalog, w.users
    elig = c.row_static_eligibility()
    cfg = w.config.logging_policy
    for batch in w.iter_logs():
        p = batch.pages
        n_rows = (p.rows >= 0).sum(1)
        assert (n_rows >= 1).all() and (n_rows <= cfg.max_rows).all()
        for b in range(len(p)):
            u = batch.user[b]
            seen = p.entities[b][p.valid[b]]
            assert len(seen) == len(set(seen)), "no entity twice on a page"
            rows = p.rows[b][p.rows[b] >= 0]
            assert len(rows) == len(set(rows)), "no row twice"
            for r in range(p.rows.shape[1]):
                row = p.rows[b, r]
                ents = p.entities[b, r][p.entities[b, r] >= 0]
                if row < 0:
                    assert len(ents) == 0
                    continue
                assert cfg.row_len_floor <= len(ents) <= cfg.max_row_len
                assert elig[row, ents].all(), (ROW_IDS[row], ents)
                if ROW_IDS[row] == CONTINUE_WATCHING:
                    assert us.resume[u, ents].all()
                if ROW_IDS[row] == NEW_RELEASES:
                    assert c.is_new[ents].all()
                if ROW_IDS[row] == KIDS:
                    assert c.kids_safe[ents].all()
                if us.profile_type[u] == 1:
                    assert c.kids_safe[ents].all(), "kids profiles never see mature titles"


def test_logs_explore_alternatives(small_world):
    """The logging policy covers the catalog and varies pages for the same user."""
    w = small_world
    user = np.zeros(200, dtype=np.int64)
    rng = np.random.default_rng(0)
    req = w.sample_requests(rng, user)
    pages = w.logging_policy.act(user, req, rng)
    first_rows = {tuple(r) for r in pages.rows}
    assert len(first_rows) > 5
    shown = np.concatenate([b.pages.entities[b.pages.valid] for b in w.iter_logs()])
    assert len(np.unique(shown)) > 0.8 * w.catalog.n
    special = {ROW_IDS.index(r) for r in (TRENDING, NEW_RELEASES)}
    assert any(set(b.pages.rows.ravel()) & special for b in w.iter_logs())


def test_batch_from_table_round_trips_pages(small_world):
    batch = next(small_world.iter_logs(300))
    table = batch_to_table(batch, small_world)
    user, req, pages = batch_from_table(small_world, table)
    np.testing.assert_array_equal(user, batch.user)
    np.testing.assert_array_equal(req.device, batch.requests.device)
    np.testing.assert_allclose(
        small_world.true_page_reward(user, req, pages),
        small_world.true_page_reward(batch.user, batch.requests, batch.pages),
    )


def test_world_config_rejects_bad_values():
    with pytest.raises(ValueError, match="split_fractions"):
        WorldConfig(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="min_rows"):
        dataclasses.replace(SMALL.logging_policy, min_rows=5, max_rows=2)


def test_row_eligibility_of_a_hand_made_catalog_follows_each_rows_category():
    """Rows looked up by name (ROW_IDS.index), so a genre row reading another genre's column, or a special row
    reading the wrong flag, fails here."""
    n, g = 3, len(GENRES)
    genres = np.zeros((n, g), dtype=bool)
    genres[0, [GENRES.index("comedy"), GENRES.index("family")]] = True
    genres[1, GENRES.index("horror")] = True
    genres[2, GENRES.index("drama")] = True
    c = Catalog(entity_ids=["movie_0", "movie_1", "show_2"], entity_type=np.array([0, 0, 1], np.int8), genres=genres,
                maturity=np.array([MATURITY.index("kids"), MATURITY.index("mature"), MATURITY.index("teen")], np.int8),
                release_day=np.array([-5, -100, -29], np.int32), popularity=np.ones(n, np.float32),
                language=np.zeros(n, np.int8), runtime_min=np.full(n, 90.0, np.float32),
                content_emb=np.eye(n, dtype=np.float32), latent=np.zeros((n, 2), np.float32),
                quality=np.zeros(n, np.float32), trending=np.array([True, False, False]), new_title_days=30)
    elig = c.row_static_eligibility()
    assert elig.shape == (len(ROW_IDS), 3)
    row = lambda row_id: elig[ROW_IDS.index(row_id)].tolist()
    # genre rows: each title's own genres (title 0 is comedy and family, 1 horror, 2 drama)
    assert row("genre_comedy") == row("genre_family") == [True, False, False]
    assert row("genre_horror") == [False, True, False] and row("genre_drama") == [False, False, True]
    assert row("genre_action") == [False, False, False]
    # special rows: new = released within 30 days (-5 and -29 yes, -100 no); kids = maturity "kids" only;
    # Continue Watching is narrowed per user later, so every title here
    assert row(NEW_RELEASES) == [True, False, True] and row(KIDS) == [True, False, False]
    assert row(TRENDING) == [True, False, False] and row(CONTINUE_WATCHING) == [True, True, True]
    row_genre = c.row_genre()
    assert row_genre[ROW_IDS.index("genre_horror")] == GENRES.index("horror") == 4
    assert [row_genre[ROW_IDS.index(r)] for r in (CONTINUE_WATCHING, TRENDING, NEW_RELEASES, KIDS)] == [-1] * 4


def test_batch_from_table_refuses_ids_outside_the_world(small_world):
    import pyarrow as pa

    table = batch_to_table(next(small_world.iter_logs(5)), small_world)
    ents = table.column("page_entity_ids").to_pylist()
    ents[2][0][0] = "movie_from_elsewhere"
    table = table.set_column(table.column_names.index("page_entity_ids"), "page_entity_ids",
                             pa.array(ents, table.schema.field("page_entity_ids").type))
    with pytest.raises(KeyError, match="movie_from_elsewhere"):
        batch_from_table(small_world, table)


def test_candidate_generation_keeps_resumable_titles_and_changes_pages_only_below_the_catalog_size(small_world):
    """With 30 candidates Continue Watching still finds every resumable title, and pages differ from the
    all-candidates policy; a candidate count of at least the catalog's size is the all-candidates policy."""
    few = few_candidates_world(small_world)
    cw = ROW_IDS.index(CONTINUE_WATCHING)
    a, b = next(small_world.iter_logs()), next(few.iter_logs())
    assert (a.pages.rows == cw).any(1).mean() == pytest.approx((b.pages.rows == cw).any(1).mean(), abs=0.02)
    assert not np.array_equal(a.pages.entities, b.pages.entities)
    policy = dataclasses.replace(small_world.config.logging_policy, candidates=small_world.catalog.n)
    same = World(dataclasses.replace(small_world.config, logging_policy=policy), small_world.catalog, small_world.users)
    np.testing.assert_array_equal(next(same.iter_logs()).pages.entities, a.pages.entities)
