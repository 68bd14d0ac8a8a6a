"""Paginated generation (HF backend, untrained tiny GenPage): no title or row repeats across pages, the
homepage obeys every mask rule, pages hold at most their quota of rows, later prompts carry the in-session
feedback as history actions, and feedback becomes actions as documented."""

import numpy as np
import pytest

from homepage.behavior import Feedback
from homepage.pages import PageBatch
from homepage.rewards import ABANDON, BINGE, LONG_PLAY, NONE, SHORT_PLAY
from policies.generate import PageGenerator
from policies.hybrid import HybridConfig
from homepage.world import SimulatorEnvironment, session_actions, world_contexts
from policies.pagination import paginate
from tests.policies.helpers import SHAPE, tiny_checkpoint


@pytest.fixture(scope="module")
def gen(small_world, tmp_path_factory):
    # max_history 64: no history action is cut, so the last prompt holds every fact the rules read
    model_dir, model, tok, rules = tiny_checkpoint(small_world, tmp_path_factory.mktemp("pagination"), max_history=64)
    return PageGenerator(model_dir, backend="hf", model=model, hf_batch_size=16)


@pytest.mark.parametrize("temperature,hybrid", [(0.0, HybridConfig()), (1.0, HybridConfig(fill_k=1, fill_row_len=4))])
def test_pages_never_repeat_a_title_or_row_and_obey_the_rules(small_world, gen, temperature, hybrid):
    rng = np.random.default_rng(0)
    users = np.concatenate([np.flatnonzero(small_world.users.profile_type == 1)[:4], np.arange(12)])
    contexts = world_contexts(small_world, users, small_world.sample_requests(rng, users))
    browse = SimulatorEnvironment.of_world(small_world).browse
    sessions = paginate(gen, contexts, browse, rows_per_page=1, n_pages=SHAPE.max_rows,
                        temperature=temperature, hybrid=hybrid, rng=rng)
    tok, rules = gen.tok, gen.rules
    multi = 0
    for s in sessions:
        titles = [e for p in s.pages for e in p.entity_ids]
        rows = [r.row_id for p in s.pages for r in p.rows]
        assert len(titles) == len(set(titles)) and len(rows) == len(set(rows))
        assert all(len(p.rows) <= 1 for p in s.pages)
        # every page starts a new row: no title was added to a row of an earlier page
        assert tok.decode(s.page_ids).rows == tuple(r for p in s.pages for r in p.rows)
        assert s.ended and s.page_ids[-1] == tok.eop_id  # max_rows pages of one row: the homepage is complete
        assert SHAPE.min_rows <= len(rows) <= SHAPE.max_rows
        # the homepage as one page under the last prompt (it holds all in-session actions): no mask rule broken
        assert rules.violations([s.prompts[-1]], [s.page_ids])["total"][0] == 0
        # each later prompt = the previous one + one history action (4 tokens, time bucket 0) per acted-on title
        for before, after, fb in zip(s.prompts, s.prompts[1:], s.feedback):
            assert len(after) == len(before) + 4 * len(fb)
            assert after[-1] == tok.page_id and after[:len(before) - 1] == before[:-1]
            assert after[len(before) - 1:-1][2::4] == [tok.vocab["tb:0"]] * len(fb)
        multi += len(s.pages) > 1
    assert multi == len(sessions)
    assert sum(len(fb) for s in sessions for fb in s.feedback) > 0  # some feedback reached a prompt


def test_feedback_becomes_history_actions(small_world):
    c = small_world.catalog
    ents = np.array([[[0, 1, 2, 3], [4, 5, -1, -1]]])  # one page, rows of 4 and 2 titles
    codes = np.array([[[NONE, ABANDON, SHORT_PLAY, LONG_PLAY], [BINGE, NONE, NONE, NONE]]], dtype=np.int8)
    minutes = np.zeros((1, 2, 4), dtype=np.float32)
    minutes[0, 0, 2] = 0.2 * c.runtime_min[2]  # short play: 20% watched
    minutes[0, 1, 0] = 3.0 * c.runtime_min[4]  # binge: three episodes
    thumbs = np.zeros((1, 2, 4), dtype=bool)
    thumbs[0, 0, 3] = True
    fb = Feedback(codes, minutes, thumbs, np.zeros((1, 2, 4), dtype=np.float32), np.array([2], dtype=np.int8))
    actions, summary = session_actions(small_world, PageBatch(np.array([[0, 1]]), ents), fb, 0)
    assert [(a.entity_id, a.action) for a in actions] == [
        (c.entity_ids[1], "abandon"), (c.entity_ids[2], "play"), (c.entity_ids[3], "thumbs_up"), (c.entity_ids[4], "binge")]
    assert all(a.days_ago == 0.0 for a in actions)
    assert actions[1].watch_fraction == pytest.approx(0.2) and actions[3].watch_fraction == pytest.approx(3.0)
    assert summary[c.entity_ids[3]] == "long play + thumbs up" and c.entity_ids[0] not in summary
