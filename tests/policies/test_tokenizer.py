import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from homepage.catalog import ROW_IDS
from homepage.logs import Context, HistoryAction
from homepage.pages import Page, Row
from policies.tokenizer import (
    KIND_ENTITY, KIND_ROW, EncodeStats, GenPageTokenizer, PageDecodeError, bucket,
)
from tests.toy import TOY_VOCAB, toy_tokenizer, world_tokenizer

ENTITIES = [f"{t}_{i:04d}" for i, t in enumerate(["movie", "show", "game"] * 20)]
TOK = toy_tokenizer(ENTITIES, max_history=5)

rows_st = st.lists(
    st.builds(Row, st.sampled_from(ROW_IDS), st.lists(st.sampled_from(ENTITIES), min_size=0, max_size=9).map(tuple)),
    min_size=0, max_size=8,
).map(tuple)
pages_st = rows_st.map(Page)


@settings(max_examples=300, deadline=None)
@given(pages_st)
def test_page_round_trip_is_exact(page):
    ids = TOK.encode_page(page)
    assert ids[-1] == TOK.eop_id
    assert len(ids) == len(page.rows) + sum(len(r.entity_ids) for r in page.rows) + 1  # one token each
    assert TOK.decode(ids) == page
    assert TOK.decode(ids + [TOK.pad_id] * 3) == page  # padding after [EOP] ignored


@settings(max_examples=100, deadline=None)
@given(pages_st)
def test_hf_tokenizer_agrees_with_domain_ids(page):
    hf = TOK.hf_tokenizer()
    text = " ".join(TOK.tokens[i] for i in TOK.encode_page(page))
    assert hf(text, add_special_tokens=False)["input_ids"] == TOK.encode_page(page)
    assert hf.decode(TOK.encode_page(page)) == text


def context(history_len=3, language="en", device="tv") -> Context:
    hist = tuple(HistoryAction(ENTITIES[i], "play", float(i * 5), 0.4) for i in range(history_len))
    return Context("user_1", language, "kids", 15, 6, device, hist)


def test_prompt_layout_and_buckets():
    ids = TOK.encode_context(context())
    toks = [TOK.tokens[i] for i in ids]
    # hour 15 falls in [12, 17): bucket 2 (afternoon) of the toy edges 6 / 12 / 17 / 22
    assert toks[:9] == ["[BOS]", "[PROFILE]", "lang:en", "ptype:kids", "[REQUEST]", "hour:2", "dow:6", "dev:tv", "[HIST]"]
    # history action = [entity][action][time bucket][duration bucket]
    assert toks[9:13] == [f"ent:{ENTITIES[0]}", "act:play", "tb:0", "db:2"]
    assert toks[-1] == "[PAGE]" and len(ids) == 9 + 3 * 4 + 1
    v = TOY_VOCAB
    assert [bucket(v.days_ago_edges, x) for x in (0.5, 1.0, 2, 5, 10, 20, 60, 365)] == [0, 1, 1, 2, 3, 4, 5, 6]
    assert [bucket(v.watch_fraction_edges, x) for x in (0.01, 0.1, 0.3, 0.6, 0.95)] == [0, 1, 2, 3, 4]
    assert [bucket(v.hour_edges, h) for h in (0, 5, 6, 12, 17, 22, 23)] == [0, 0, 1, 2, 3, 4, 4]
    assert v.partial_buckets == (1, 2, 3)  # 5% .. 90% watched


def test_history_is_truncated_to_most_recent_and_counted():
    stats = EncodeStats()
    ids = TOK.encode_context(context(history_len=8), stats)
    assert stats.truncated_history_actions == 3
    assert TOK.tokens[ids[9]] == f"ent:{ENTITIES[3]}"  # oldest kept is the 4th
    # a full history is the longest prompt: 9 fixed tokens + 4 per action (max_history 5) + [PAGE] = 30
    assert len(ids) == TOK.max_prompt_tokens == 30
    assert len(TOK.encode_context(context(history_len=2))) < TOK.max_prompt_tokens


def test_unknown_ids_map_to_fallbacks_and_are_counted():
    stats = EncodeStats()
    page = Page((Row("genre_comedy", ("movie_9999", "show_x", "weird")), Row("holiday_specials", ("game_0002",))))
    ids = TOK.encode_page(page, stats)
    names = [TOK.tokens[i] for i in ids]
    assert names[1:4] == ["ent:<unk>"] * 3  # an unknown id has no known type
    assert names[4] == "row:<unk>"
    assert stats.unknown_entities == 3 and stats.unknown_rows == 1
    ids = TOK.encode_context(context(language="de"), stats)
    assert TOK.tokens[ids[2]] == "lang:<unk>" and stats.by_field == {"lang": 1}


def test_decode_rejects_malformed_pages():
    e = TOK.vocab[f"ent:{ENTITIES[0]}"]
    r = TOK.vocab["row:kids"]
    with pytest.raises(PageDecodeError, match="entity before any row"):
        TOK.decode([e, TOK.eop_id])
    with pytest.raises(PageDecodeError, match="without the end-of-page"):
        TOK.decode([r, e])
    with pytest.raises(PageDecodeError, match="position 1"):
        TOK.decode([r, TOK.vocab["act:play"], TOK.eop_id])
    assert TOK.decode([e, r, e], strict=False) == Page((Row("kids", (ENTITIES[0],)),))


def test_token_kinds_cover_rows_and_entities():
    assert (TOK.token_kind == KIND_ROW).sum() == len(ROW_IDS) + 1
    assert (TOK.token_kind == KIND_ENTITY).sum() == len(ENTITIES) + 4
    assert TOK.vocab[f"ent:{ENTITIES[5]}"] == TOK.first_entity_id + 5


def test_save_pretrained_and_auto_tokenizer_round_trip(tmp_path):
    TOK.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    loaded = GenPageTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab == TOK.vocab and loaded.max_history == 5
    assert loaded.context_vocab == TOK.context_vocab and loaded.same_vocabulary(TOK) is None
    other = toy_tokenizer(ENTITIES[:-1], max_history=5)
    assert "tokens only in one" in TOK.same_vocabulary(other)
    assert hf.eos_token == "[EOP]" and hf.pad_token == "[PAD]" and hf.bos_token == "[BOS]"
    ctx = context()
    # verl applies the chat template; its generation prompt is the [PAGE] marker.
    text = hf.apply_chat_template([{"role": "user", "content": TOK.prompt_text(ctx)}], add_generation_prompt=True, tokenize=False)
    assert hf(text, add_special_tokens=False)["input_ids"] == TOK.encode_context(ctx)
    with pytest.raises(FileNotFoundError, match="not a GenPage tokenizer"):
        GenPageTokenizer.from_pretrained(tmp_path / "nothing")


def test_encode_impression_from_logs(small_world):
    from homepage.logs import batch_to_table, iter_impressions

    tok = world_tokenizer(small_world)
    table = batch_to_table(next(small_world.iter_logs(20)), small_world)
    stats = EncodeStats()
    for imp in iter_impressions(table):
        prompt, page = tok.encode(imp, stats)
        assert tok.decode(page) == imp.page
        assert prompt[-1] == tok.page_id
    assert stats.impressions == 20 and stats.unknown_entities == 0 and stats.truncated_history_actions == 0


def test_type_fallbacks_come_from_the_catalog_types():
    tok = toy_tokenizer(["tt0111161", "nm0000001"], entity_types=["film", "film"])
    assert tok.tokens[tok.fallback_of("tt0111161")] == "ent:<unk_film>"
    with pytest.raises(ValueError, match="whitespace"):
        toy_tokenizer(["a b"], entity_types=["film"])


def test_the_toy_vocabulary_is_what_the_toy_dataset_gives(small_world, tmp_path):
    import pyarrow.parquet as pq

    from homepage.dataset import open_dataset
    from homepage.logs import batch_to_table
    from tests.toy import world_dataset

    data = world_dataset(small_world, tmp_path / "data")
    (data.root / "logs").mkdir()
    pq.write_table(batch_to_table(next(small_world.iter_logs(50)), small_world), data.root / "logs" / "part-00000.parquet")
    dataset, table, _ = open_dataset(data.root)
    assert GenPageTokenizer.from_dataset(dataset, table).same_vocabulary(world_tokenizer(small_world)) is None


def test_is_title_token_marks_catalog_titles_only():
    import numpy as np

    from policies.tokenizer import is_title_token

    by_text = np.array([is_title_token(t) for t in TOK.tokens])  # [V] from the token text
    assert by_text.sum() == len(ENTITIES)  # the 4 entity fallbacks (ent:<unk...>) are not titles
    assert [TOK.tokens[i] for i in np.flatnonzero(by_text)] == [f"ent:{e}" for e in TOK.entity_ids]
    assert not is_title_token("ent:<unk>") and not is_title_token("row:kids") and is_title_token(f"ent:{ENTITIES[0]}")
