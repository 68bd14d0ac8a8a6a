"""The rule engine: masks never dead-end, pages written under them obey the rules as the world defines them
(checked independently, from the world's own users and catalog), the vectorized masks (one step, all
positions) equal the plain-loop reference rule by rule, the format reward counts known violations, and the
mask replayed inside GenPage's forward is the same mask."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homepage.catalog import CONTINUE_WATCHING, GENRES, KIDS, MATURITY, NEW_RELEASES, TRENDING
from policies.hybrid import allowed_fill
from policies.rules import MODES, RULES, RULES_FILE, RuleConfig, RuleModes, RuleSet, attach_rules, build_ruleset
from policies.rules_reference import reference_allowed, reference_rule_masks
from tests.policies.helpers import CONFIG, SHAPE, prompt_of, walk
from tests.toy import world_dataset, world_tokenizer


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    tok = world_tokenizer(small_world)
    rules = build_ruleset(tok, world_dataset(small_world, path), CONFIG)
    return small_world, tok, rules, path


def check_page(world, tok, user: int, page: list[int]) -> list[str]:
    """Independent rule check against the world's data; returns the violations found."""
    c, us = world.catalog, world.users
    idx = world.entity_index
    decoded = tok.decode(page)
    problems = []
    if not SHAPE.min_rows <= len(decoded.rows) <= SHAPE.max_rows:
        problems.append(f"{len(decoded.rows)} rows")
    row_ids = [r.row_id for r in decoded.rows]
    if len(set(row_ids)) != len(row_ids):
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
    # Pin and critical row, where the user's data lets them be filled from the start (3 eligible titles).
    safe = c.kids_safe | (us.profile_type[user] == 0)
    if (c.trending & safe).sum() >= SHAPE.min_row_len and (not row_ids or row_ids[0] != TRENDING):
        problems.append("trending_now not pinned first")
    resumable = us.resume[user] & safe
    if resumable.sum() >= SHAPE.min_row_len + 6 and CONTINUE_WATCHING not in row_ids[:3]:
        problems.append("continue_watching not within the first 3 rows")  # (+6: earlier rows may take some)
    return problems


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.integers(0, 199), seed=st.integers(0, 10_000))
def test_random_walks_under_the_mask_never_dead_end_and_obey_the_rules(setup, user, seed):
    world, tok, rules, _ = setup
    rng = np.random.default_rng(seed)
    prompt = prompt_of(world, tok, user, seed)
    page = walk(rules, tok, prompt, rng)
    assert page[-1] == tok.eop_id
    assert check_page(world, tok, user, page) == []
    assert rules.violations([prompt], [page])["total"][0] == 0


def kids_pool_rules(world, tmp_path, kids_pool: int):
    """Tokenizer and default ruleset of `world` with only its first `kids_pool` titles kids-safe."""
    c = world.catalog
    c.maturity[:] = np.where(np.arange(len(c.maturity)) < kids_pool, 0, MATURITY.index("mature"))
    tok = world_tokenizer(world)
    rules = build_ruleset(tok, world_dataset(world, tmp_path / "data"), RuleConfig())
    return tok, rules


def title_hungry_page(rules, tok, prompt) -> list[int]:
    """A page that takes a title whenever the masks allow one, else the last allowed token (the kids row
    first among row tokens): rows as long as the masks let them be."""
    page = []
    while not page or page[-1] != tok.eop_id:
        allowed = rules.allowed_step([prompt], [page])[0]
        titles = (allowed & rules.is_entity).nonzero().flatten()
        page.append(int(titles[0] if len(titles) else allowed.nonzero().flatten()[-1]))
    return page


@pytest.mark.parametrize("kids_pool", [16, 40])
def test_title_hungry_pages_of_kids_profiles_still_reach_min_rows(controlled_world, tmp_path, kids_pool):
    """A policy that takes every title the masks allow (the broad kids row first, 8 titles a row) must not use
    up a kids profile's small pool of kids-safe titles before the page has min_rows rows: the masks look ahead
    (default page shape; without the look-ahead every page with a pool of 16 ends after 2 rows)."""
    world = controlled_world
    tok, rules = kids_pool_rules(world, tmp_path, kids_pool)
    kids = np.flatnonzero(world.users.profile_type == 1)
    assert len(kids) >= 10
    for user in kids:
        prompt = prompt_of(world, tok, int(user))
        page = title_hungry_page(rules, tok, prompt)
        assert rules.violations([prompt], [page])["total"][0] == 0, (user, tok.decode(page))
        assert len(tok.decode(page).rows) >= rules.config.shape.min_rows
        if user in kids[:8]:  # the look-ahead is the same in the trainer's replay and in the reference loop
            combined = rules.allowed(rules.state_all_positions(torch.tensor([prompt + page]), torch.tensor([len(prompt)])))
            for i in range(len(page)):
                want = reference_allowed(rules, prompt, page[:i])
                assert set(combined[0, len(prompt) - 1 + i].nonzero().flatten().tolist()) == want, i


def test_hybrid_fill_stops_where_the_masks_stop_the_row(controlled_world, tmp_path):
    """Hybrid decoding writes a row's fill in one go; allowed_fill cuts it where the masks (look-ahead
    included) would not let the row grow, so a fill cannot use up the titles later rows need."""
    world = controlled_world
    c = world.catalog
    tok, rules = kids_pool_rules(world, tmp_path, 16)
    prompt = prompt_of(world, tok, int(np.flatnonzero(world.users.profile_type == 1)[0]))
    safe = [tok.vocab[f"ent:{e}"] for e in np.asarray(c.entity_ids)[:16]]
    mature = tok.vocab[f"ent:{c.entity_ids[20]}"]
    kids_row = tok.vocab[f"row:{KIDS}"]
    # one row of 3 on the page, two more rows needed from 13 kids-safe titles: the row may not grow
    assert allowed_fill(rules, prompt, [kids_row, *safe[:3]], safe[3:8]) == []
    # a mature title ends the fill where it stands (maturity), the titles before it stay
    assert allowed_fill(rules, prompt, [kids_row, safe[0]], [safe[1], safe[2], mature, safe[3]]) == [safe[1], safe[2]]
    # once the page has its 3 rows, a row grows freely: the titles a title-hungry walk put in its third row
    page = title_hungry_page(rules, tok, prompt)
    third = [i for i, t in enumerate(page) if t in rules.row_of][2]
    end = next(i for i in range(third + 1, len(page)) if page[i] in rules.row_of or page[i] == tok.eop_id)
    assert end - third - 1 > 3  # the third row took more than 3 titles
    assert allowed_fill(rules, prompt, page[:third + 4], page[third + 4:end]) == page[third + 4:end]
    assert allowed_fill(rules, prompt, [], []) == []


modes_strategy = st.builds(RuleModes, **{r: st.sampled_from(MODES) for r in RULES})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.integers(0, 199), seed=st.integers(0, 10_000), modes=modes_strategy, noise=st.sampled_from([0.0, 0.1, 0.5]))
def test_vectorized_masks_equal_the_reference_loop_rule_by_rule(setup, user, seed, modes, noise):
    world, tok, base, _ = setup
    rules = RuleSet(dataclasses.replace(base.config, modes=modes), base.tables)
    rng = np.random.default_rng(seed)
    prompt = prompt_of(world, tok, user, seed)
    page = walk(rules, tok, prompt, rng, noise=noise)
    # all positions of the full sequence at once (what the trainer replays) ...
    ids = torch.tensor([prompt + page])
    state = rules.state_all_positions(ids, torch.tensor([len(prompt)]))
    all_pos = rules.rule_masks(state)
    combined = rules.allowed(state)
    # the trainer's replay computes the rules on the active positions only: same mask everywhere
    assert torch.equal(rules.allowed_all_positions(ids, torch.tensor([len(prompt)])), combined)
    for i in range(len(page)):
        ref = reference_rule_masks(rules, prompt, page[:i])
        pos = len(prompt) - 1 + i  # position predicting page token i
        for r in rules.audited_rules:
            assert set(all_pos[r][0, pos].nonzero().flatten().tolist()) == ref[r], (r, i)
        want = reference_allowed(rules, prompt, page[:i])
        assert set(combined[0, pos].nonzero().flatten().tolist()) == want, i
        assert combined[0, pos].any() and want  # never a dead end
    # ... and one decoding step for every prefix in one batch (what vLLM and HF generation use)
    step = rules.allowed_step([prompt] * len(page), [page[:i] for i in range(len(page))])
    assert torch.equal(step, combined[0, len(prompt) - 1: len(prompt) - 1 + len(page)])


def test_resumable_titles_and_kids_profile_come_from_the_prompt(setup):
    world, tok, rules, _ = setup
    user = int(np.flatnonzero(world.users.resume.any(1))[0])
    prompt = prompt_of(world, tok, user)
    resumable, profile_ok = rules.prompt_facts(torch.tensor([prompt]), torch.tensor([len(prompt)]))
    expected = {tok.vocab[f"ent:{world.catalog.entity_ids[n]}"] for n in np.flatnonzero(world.users.resume[user])}
    assert set(resumable[0].nonzero().flatten().tolist()) == expected
    titles = profile_ok[0, rules.is_entity].numpy()  # [N] in catalog order
    kids = world.users.profile_type[user] == 1
    assert (titles == (world.catalog.kids_safe | (not kids))).all()


def test_mask_blocks_known_violations_and_format_reward_counts_them(setup):
    world, tok, base, _ = setup
    c = world.catalog
    rules = RuleSet(dataclasses.replace(base.config, pinned_rows={}, critical_rows={}), base.tables)
    kids_user = int(np.flatnonzero(world.users.profile_type == 1)[0])
    prompt = prompt_of(world, tok, kids_user)
    row = tok.vocab["row:genre_comedy"]
    first = rules.allowed_step([prompt], [[row]])[0]
    comedy_safe = [tok.vocab[f"ent:{e}"] for n, e in enumerate(c.entity_ids) if c.genres[n, GENRES.index("comedy")] and c.kids_safe[n]]
    mature_n = np.flatnonzero(~c.kids_safe)
    mature = [tok.vocab[f"ent:{c.entity_ids[n]}"] for n in mature_n]
    assert first[comedy_safe].all() and not first[mature].any()
    assert not first[tok.eop_id] and not first[rules.is_row].any()  # a row needs min_row_len titles first
    page = [row] + comedy_safe[:3]
    after = rules.allowed_step([prompt], [page])[0]
    assert not after[comedy_safe[:3]].any()  # no title twice
    assert not after[row]  # no row twice
    assert not after[tok.eop_id]  # fewer than min_rows rows so far
    assert after[comedy_safe[3]] and after[rules.is_row].any()
    # [row, mature title, same title again, EOP]: maturity 2 (twice mature), dedup 1, structure 1 (EOP after
    # one title: row too short and too few rows), category 0 or 2 (whether the title is a comedy)
    bad = [row, mature[0], mature[0], tok.eop_id]
    v = rules.violations([prompt], [bad])
    is_comedy = bool(c.genres[mature_n[0], GENRES.index("comedy")])
    assert (v["maturity"][0], v["dedup"][0], v["structure"][0]) == (2, 1, 1)
    assert v["category"][0] == (0 if is_comedy else 2)
    assert v["total"][0] == sum(v[r][0] for r in RULES)
    # Reward mode: the score is minus the weighted violations of reward-mode rules only.
    soft = RuleSet(dataclasses.replace(rules.config, modes=RuleModes(maturity="reward", dedup="reward"),
                                       format_weights={"maturity": 0.5}), rules.tables)
    rep = soft.format_reward([prompt, prompt], [bad, page + [tok.vocab["row:kids"]] + comedy_safe[3:6] + [tok.eop_id]])
    assert rep.score[0] == pytest.approx(-(0.5 * 2 + 1.0 * 1))
    assert rep.violations["total"][0] == v["structure"][0] + v["category"][0]  # mask-mode rules only
    # An unfinished page (no [EOP]) is a structure violation.
    assert rules.violations([prompt], [page])["structure"][0] == 1


def test_a_pinned_row_is_forced_at_its_position_and_the_page_cannot_end_before_it(setup):
    world, tok, base, _ = setup
    rules = RuleSet(dataclasses.replace(base.config, pinned_rows={NEW_RELEASES: 1}, critical_rows={}), base.tables)
    adult = int(np.flatnonzero(world.users.profile_type == 0)[0])
    prompt = prompt_of(world, tok, adult)
    first = rules.allowed_step([prompt], [[]])[0]
    assert not first[tok.vocab[f"row:{NEW_RELEASES}"]] and first[tok.vocab["row:genre_drama"]]
    new_titles = [tok.vocab[f"ent:{e}"] for n, e in enumerate(world.catalog.entity_ids) if world.catalog.is_new[n]]
    assert len(new_titles) >= 3
    drama = [tok.vocab[f"ent:{e}"] for n, e in enumerate(world.catalog.entity_ids)
             if world.catalog.genres[n, GENRES.index("drama")] and not world.catalog.is_new[n]][:3]
    second = rules.allowed_step([prompt], [[tok.vocab["row:genre_drama"], *drama]])[0]
    rows_allowed = [t for t in second.nonzero().flatten().tolist() if rules.is_row[t]]
    assert rows_allowed == [tok.vocab[f"row:{NEW_RELEASES}"]]  # the only row that may open at position 1


def same_tables(a: dict, b: dict) -> bool:
    def plain(v):
        if isinstance(v, np.ndarray):
            return v.tolist()
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

    return plain(a) == plain(b)


def test_ruleset_round_trips_through_a_checkpoint_and_rejects_bad_configs(setup, tmp_path):
    _, _, rules, _ = setup
    (tmp_path / "config.json").write_text("{}")
    attach_rules(tmp_path, rules)
    again = RuleSet.from_pretrained(tmp_path)
    assert again.config == rules.config and same_tables(again.tables, rules.tables)
    assert torch.equal(again.row_elig, rules.row_elig) and torch.equal(again.is_entity, rules.is_entity)
    assert again.restricted.keys() == rules.restricted.keys() and len(rules.restricted) > 0
    assert all(torch.equal(again.restricted[k], m) for k, m in rules.restricted.items())
    def bad(**kw):
        RuleSet(dataclasses.replace(rules.config, **kw), rules.tables)

    with pytest.raises(ValueError, match="unknown row"):
        bad(pinned_rows={"nope": 0})
    with pytest.raises(ValueError, match="same position"):
        bad(pinned_rows={TRENDING: 0, KIDS: 0})
    with pytest.raises(ValueError, match="must be one of"):
        RuleModes(category="soft")
    with pytest.raises(ValueError, match="every position within k is pinned"):
        bad(pinned_rows={TRENDING: 0}, critical_rows={CONTINUE_WATCHING: 1})


def test_rule_tables_live_in_their_own_file_checked_against_config_json(setup, tmp_path):
    import json
    import shutil

    from policies.build import ModelSize, build_model

    _, tok, rules, _ = setup
    model = build_model(tok, {}, ModelSize(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32))
    model.attach_rules(rules)
    src, copy = tmp_path / "src", tmp_path / "copy"
    model.save_pretrained(src)
    header = json.loads((src / "config.json").read_text())["business_rules"]
    V8 = (len(tok) + 7) // 8
    # config.json holds the header only: no per-title mask, whatever the catalog's size
    assert header["file"] == RULES_FILE and "entities" not in header and "restricted" not in header
    assert (src / RULES_FILE).stat().st_size >= V8 * (1 + len(header["eligible_rows"]) + len(rules.restricted))
    assert [p.name for p in src.glob("*.safetensors")] == ["model.safetensors"]  # vLLM loads every one as weights
    # a model loaded from the checkpoint has its rules after the directory is gone, and saves them again
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(src)
    shutil.rmtree(src)
    loaded.save_pretrained(copy)
    again = RuleSet.from_pretrained(copy)
    assert torch.equal(again.row_elig, rules.row_elig) and again.config == rules.config
    # a tables file that is not the one config.json names is refused, and so is a missing one
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    attach_rules(tmp_path / "other", rules.with_modes(category="reward"))
    entities = rules.tables["entities"].copy()
    entities[0] ^= 1  # another catalog: one title more or less
    attach_rules(copy, RuleSet(rules.config, {**rules.tables, "entities": entities}))
    shutil.copy(copy / RULES_FILE, tmp_path / "stale")
    attach_rules(copy, rules)
    shutil.copy(tmp_path / "stale", copy / RULES_FILE)
    with pytest.raises(ValueError, match=f"{RULES_FILE} does not match config.json"):
        RuleSet.from_pretrained(copy)
    (copy / RULES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{RULES_FILE} not found"):
        RuleSet.from_pretrained(copy)
    assert RuleSet.from_pretrained(tmp_path / "other").config.modes.category == "reward"


def test_mask_replay_in_forward_equals_the_engine_mask_with_padding_and_packing(setup):
    from policies.build import ModelSize, build_model

    world, tok, rules, _ = setup
    rng = np.random.default_rng(0)
    model = build_model(tok, {}, ModelSize(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64)).eval()
    model.attach_rules(rules)
    seqs = []
    for user in (0, 1, 2):
        prompt = prompt_of(world, tok, user)
        seqs.append((prompt, walk(rules, tok, prompt, rng, noise=0.2)))
    T = max(len(p) + len(g) for p, g in seqs) + 2
    # Left-padded prompts, right-padded pages (the trainer's layout).
    ids = torch.full((3, T), tok.pad_id)
    attn = torch.zeros(3, T, dtype=torch.long)
    for b, (p, g) in enumerate(seqs):
        ids[b, 1: 1 + len(p) + len(g)] = torch.tensor(p + g)
        attn[b, 1: 1 + len(p) + len(g)] = 1
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=attn).logits
        model.config.mask_logits = True
        masked = model(input_ids=ids, attention_mask=attn).logits
    neg = torch.finfo(masked.dtype).min / 2
    for b, (p, g) in enumerate(seqs):
        want = rules.allowed_step([p] * len(g), [g[:i] for i in range(len(g))])  # [len(g), V]
        got = masked[b, len(p): len(p) + len(g)]  # positions predicting page tokens (offset 1 = left pad)
        assert torch.equal(got > neg / 2, want)
        assert torch.equal(got[want], raw[b, len(p): len(p) + len(g)][want])  # allowed logits untouched
        assert torch.equal(masked[b, :len(p)], raw[b, :len(p)])  # padding and prompt positions: no mask
        assert torch.equal(masked[b, 1 + len(p) + len(g):], raw[b, 1 + len(p) + len(g):])  # after [EOP]: none
        assert torch.isfinite(masked[b]).all()
    # Packed: the three sequences in one row, position ids restarting per sequence, no padding.
    flat = torch.tensor([[t for p, g in seqs for t in p + g]])
    pos = torch.tensor([[i for p, g in seqs for i in range(len(p) + len(g))]])
    with torch.no_grad():
        packed = model.rules.mask_logits(torch.zeros(1, flat.shape[1], len(tok)), flat, pos)
    start = 0
    for b, (p, g) in enumerate(seqs):
        want = rules.allowed_step([p] * len(g), [g[:i] for i in range(len(g))])
        got = packed[0, start + len(p) - 1: start + len(p) - 1 + len(g)]
        assert torch.equal(got == 0, want)
        start += len(p) + len(g)


def test_verl_padded_rows_take_the_batch_wide_mask_replay(setup, monkeypatch):
    """verl's trainer layout: each row one sequence from position 0, right-padded, its position_ids padded with 0s.
    With the attention mask the padding is not a second sequence: one batch-wide rule pass (not one per row), and the
    logits equal the per-sequence replay's at every real position."""
    world, tok, rules, _ = setup
    rng = np.random.default_rng(1)
    seqs = []
    for user in (0, 1, 2, 3):
        prompt = prompt_of(world, tok, user)
        seqs.append(prompt + walk(rules, tok, prompt, rng, noise=0.2))
    T = max(map(len, seqs)) + 3
    ids = torch.full((len(seqs), T), tok.pad_id)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    pos = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], attn[b, :len(s)], pos[b, :len(s)] = torch.tensor(s), 1, torch.arange(len(s))
    logits = torch.randn(len(seqs), T, len(tok))
    per_sequence = rules.mask_logits(logits.clone(), ids, pos)  # without the mask: the padding looks like a sequence
    calls = []
    original = type(rules).allowed_active
    monkeypatch.setattr(type(rules), "allowed_active", lambda self, *a: calls.append(1) or original(self, *a))
    batch_wide = rules.mask_logits(logits.clone(), ids, pos, attn)
    assert len(calls) == 1
    real = attn.bool()
    assert torch.equal(batch_wide[real], per_sequence[real])
    assert (batch_wide[real] != logits[real]).any()  # the mask did act


def test_mask_replay_on_active_positions_equals_the_full_mask_and_its_gradient(setup):
    """The batch-wide replay masks only the active positions' logits [N, V]; logits and gradients equal masking
    with the materialized [B, T, V] mask of `allowed_all_positions`."""
    world, tok, rules, _ = setup
    rng = np.random.default_rng(2)
    seqs = [prompt_of(world, tok, u) + walk(rules, tok, prompt_of(world, tok, u), rng, noise=0.3) for u in (4, 5, 6)]
    T = max(map(len, seqs)) + 2
    ids = torch.full((len(seqs), T), tok.pad_id)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], attn[b, :len(s)] = torch.tensor(s), 1
    pos = torch.arange(T).expand(len(seqs), T) * attn
    raw = torch.randn(len(seqs), T, len(tok))
    is_page = ids == rules.page_id
    full = rules.allowed_all_positions(ids, is_page.long().argmax(-1) + 1)  # [B, T, V]
    assert (~full).any()
    a, b_ = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    got = rules.mask_logits(a, ids, pos, attn)
    want = b_.masked_fill(~full, torch.finfo(raw.dtype).min / 2)
    assert torch.equal(got, want)
    weights = torch.randn_like(raw)
    (got.log_softmax(-1) * weights).sum().backward()
    (want.log_softmax(-1) * weights).sum().backward()
    assert torch.allclose(a.grad, b_.grad, atol=1e-6)
    assert torch.equal(a.detach(), raw)  # the caller's logits are not changed in place
