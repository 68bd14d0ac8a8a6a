"""The step-by-step rule mask: never dead-ends, and pages written under it obey the rules as the world
defines them (checked independently of the engine, from the world's own users and catalog)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homepage.catalog import CONTINUE_WATCHING, GENRES, KIDS, MATURITY, NEW_RELEASES, TRENDING
from homepage.world import world_contexts
from policies.rules import PageShape, RuleEngine
from policies.tokenizer import GenPageTokenizer

SHAPE = PageShape(min_rows=2, max_rows=4, min_row_len=3, max_row_len=5)


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    c = small_world.catalog
    path = tmp_path_factory.mktemp("cat") / "catalog.parquet"
    pq.write_table(pa.table({
        "entity_id": c.entity_ids,
        "genres": [[g for g, on in zip(GENRES, row) if on] for row in c.genres],
        "maturity": [MATURITY[m] for m in c.maturity],
        "release_day": c.release_day,
    }), path)
    tok = GenPageTokenizer(c.entity_ids, max_history=small_world.config.history_max)
    rules = RuleEngine(tok, path, c.new_title_days, SHAPE, trending=set(np.asarray(c.entity_ids)[c.trending]))
    return small_world, tok, rules


def walk(rules, tok, prompt, rng, max_len=60):
    """Writes a page by choosing uniformly among allowed tokens; asserts no step is a dead end."""
    page = []
    for _ in range(max_len):
        allowed = rules.allowed(prompt, page)
        assert allowed.any(), f"dead end after {page}"
        assert not allowed[tok.row_fallback_id] and not allowed[tok.pad_id]
        t = int(rng.choice(np.flatnonzero(allowed)))
        page.append(t)
        if t == tok.eop_id:
            return page
    raise AssertionError("page did not end within max_len")


def check_page(world, tok, user: int, page: list[int]) -> list[str]:
    """Independent rule check against the world's data; returns the violations found."""
    c, us = world.catalog, world.users
    idx = world.entity_index
    decoded = tok.decode(page)
    problems = []
    if not SHAPE.min_rows <= len(decoded.rows) <= SHAPE.max_rows:
        problems.append(f"{len(decoded.rows)} rows")
    if len({r.row_id for r in decoded.rows}) != len(decoded.rows):
        problems.append("row twice")
    ents = decoded.entity_ids
    if len(set(ents)) != len(ents):
        problems.append("entity twice")
    for row in decoded.rows:
        if not SHAPE.min_row_len <= len(row.entity_ids) <= SHAPE.max_row_len:
            problems.append(f"row {row.row_id} has {len(row.entity_ids)} titles")
        for e in row.entity_ids:
            n = idx[e]
            if us.profile_type[user] == 1 and not c.kids_safe[n]:
                problems.append(f"{e} is mature for a kids profile")
            if row.row_id.startswith("genre_") and not c.genres[n, GENRES.index(row.row_id[6:])]:
                problems.append(f"{e} not in {row.row_id}")
            if row.row_id == CONTINUE_WATCHING and not us.resume[user, n]:
                problems.append(f"{e} not resumable")
            if row.row_id == NEW_RELEASES and not c.is_new[n]:
                problems.append(f"{e} not new")
            if row.row_id == KIDS and not c.kids_safe[n]:
                problems.append(f"{e} not kids-safe")
            if row.row_id == TRENDING and not c.trending[n]:
                problems.append(f"{e} not trending")
    return problems


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.integers(0, 199), seed=st.integers(0, 10_000))
def test_random_walks_under_the_mask_never_dead_end_and_obey_the_rules(setup, user, seed):
    world, tok, rules = setup
    rng = np.random.default_rng(seed)
    req = world.sample_requests(rng, np.array([user]))
    prompt = tok.encode_context(world_contexts(world, np.array([user]), req)[0])
    page = walk(rules, tok, prompt, rng)
    assert check_page(world, tok, user, page) == []
    assert rules.violations(prompt, page) == 0


def test_resumable_titles_come_from_the_prompt_history(setup):
    world, tok, rules = setup
    user = int(np.flatnonzero(world.users.resume.any(1))[0])
    prompt = tok.encode_context(world_contexts(world, np.array([user]), world.sample_requests(np.random.default_rng(0), np.array([user])))[0])
    resumable, kids = rules.prompt_facts(prompt)
    expected = {tok.vocab[f"ent:{world.catalog.entity_ids[n]}"] for n in np.flatnonzero(world.users.resume[user])}
    assert set(np.flatnonzero(resumable)) == expected
    assert kids == (world.users.profile_type[user] == 1)


def test_mask_blocks_known_violations(setup):
    world, tok, rules = setup
    c = world.catalog
    kids_user = int(np.flatnonzero(world.users.profile_type == 1)[0])
    prompt = tok.encode_context(world_contexts(world, np.array([kids_user]), world.sample_requests(np.random.default_rng(0), np.array([kids_user])))[0])
    row = tok.vocab["row:genre_comedy"]
    first = rules.allowed(prompt, [row])
    comedy_safe = [tok.vocab[f"ent:{e}"] for n, e in enumerate(c.entity_ids) if c.genres[n, GENRES.index("comedy")] and c.kids_safe[n]]
    mature = [tok.vocab[f"ent:{e}"] for n, e in enumerate(c.entity_ids) if not c.kids_safe[n]]
    assert first[comedy_safe].all() and not first[mature].any()
    assert not first[tok.eop_id] and not first[rules.is_row].any()  # a row needs min_row_len titles first
    page = [row] + comedy_safe[:3]
    after = rules.allowed(prompt, page)
    assert not after[comedy_safe[:3]].any()  # no title twice
    assert not after[row]  # no row twice
    assert not after[tok.eop_id]  # fewer than min_rows rows so far
    assert after[comedy_safe[3]] and after[rules.is_row].any()
    assert rules.violations(prompt, [row, mature[0], tok.eop_id]) == 2
