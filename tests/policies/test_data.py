"""Padding sequences into a batch (policies.data.pad_batch), the one helper every batch builder uses."""

import numpy as np
import pytest
import torch

from policies.data import IGNORE_INDEX, collate, pad_batch


def test_right_and_left_padding_by_hand():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")  # a prompt batch to generate from
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5], []], pad_id=9, length=3)  # a wider batch; an empty row is all padding
    assert ids.tolist() == [[5, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 0, 0], [0, 0, 0]]
    assert pad_batch([], pad_id=0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="does not fit length=2"):
        pad_batch([[1, 2, 3]], pad_id=0, length=2)


def test_float_values_keep_their_bits_and_nan_pads():
    nan = float("nan")
    values, mask = pad_batch([np.array([nan, 0.1], np.float32), np.array([2.5], np.float32)], nan, length=3,
                             dtype=torch.float32)
    expected = torch.tensor([[nan, 0.1, nan], [2.5, nan, nan]])
    assert values.dtype == torch.float32 and torch.equal(values.isnan(), expected.isnan())
    assert torch.equal(values[~values.isnan()], expected[~expected.isnan()])  # 0.1 as float32, exactly
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0]]


def test_collate_labels_only_page_tokens():
    b = collate([[1, 2], [3]], [[10, 11], [12]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 10, 11], [3, 12, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    no = IGNORE_INDEX
    assert b["labels"].tolist() == [[no, no, 10, 11], [no, 12, no, no]]


# -- encoded logs: every impression encoded once, in memory or as a memory-mapped cache -----------------------

def small_logs(world):
    import pyarrow as pa

    from homepage.logs import batch_to_table

    return pa.concat_tables([batch_to_table(b, world) for b in world.iter_logs()])


def test_token_lists_read_take_and_search_like_lists():
    from policies.data import TokenLists

    lists = [[1, 2], [3], [4, 5, 6], [7]]
    tl = TokenLists.from_lists(lists)
    assert len(tl) == 4 and [tl[i] for i in range(4)] == lists and tl[1:3] == lists[1:3]
    assert tl.lengths().tolist() == [2, 1, 3, 1]
    sub = tl.take([2, 0])
    assert [sub[0], sub[1]] == [[4, 5, 6], [1, 2]] and sub.values is tl.values  # a view, not a copy
    assert tl.contains_any([5, 7]).tolist() == [False, False, True, True]


def test_encoded_logs_are_the_tokenizers_encoding_of_every_impression(small_world, monkeypatch):
    import policies.data as data
    from homepage.logs import iter_impressions
    from tests.toy import world_tokenizer

    table, tok = small_logs(small_world), world_tokenizer(small_world)
    monkeypatch.setattr(data, "ENCODE_CHUNK", 7)  # chunk boundaries inside the table
    enc = data.encode_logs(table, tok, progress=False)
    imps = list(iter_impressions(table))
    assert len(enc) == len(imps) == table.num_rows
    for i in (0, 6, 7, 8, len(imps) - 1):
        p, g = tok.encode(imps[i])
        assert enc.prompts[i] == p and enc.pages[i] == g
        assert (enc.split[i], enc.user_ids[i]) == (imps[i].split, imps[i].context.user_id)
        assert enc.page_reward[i] == pytest.approx(imps[i].page_reward)
    assert enc.stats.impressions == len(imps)


def test_selecting_a_split_positive_pages_and_no_excluded_title_counts_what_it_leaves_out(small_world):
    from homepage.logs import iter_impressions
    from policies.data import encode_logs, encode_table
    from tests.toy import world_tokenizer

    table, tok = small_logs(small_world), world_tokenizer(small_world)
    excluded = frozenset(tok.entity_ids[3:6])
    seqs, skipped = encode_logs(table, tok, progress=False).select(tok, "train", 0.0, excluded)
    expected, counts = [], {"other_split": 0, "not_positive": 0, "holds_excluded_title": 0}
    for imp in iter_impressions(table):  # the filters by hand, in their order
        if imp.split != "train":
            counts["other_split"] += 1
        elif imp.page_reward <= 0.0:
            counts["not_positive"] += 1
        elif excluded & {*imp.page.entity_ids, *(h.entity_id for h in imp.context.history)}:
            counts["holds_excluded_title"] += 1
        else:
            expected.append(tok.encode(imp))
    assert skipped == counts and all(counts.values())
    assert [(seqs.prompts[i], seqs.pages[i]) for i in range(len(seqs))] == expected
    in_memory, skipped_again = encode_table(table, tok, "train", 0.0, excluded)  # encodes the split's rows only
    assert skipped_again == counts and [in_memory.pages[i] for i in range(len(in_memory))] == [g for _, g in expected]


def test_the_cache_is_read_back_memory_mapped_and_keyed_by_tokenizer_and_files(small_world, tmp_path, monkeypatch):
    import numpy as np

    from policies.data import encode_logs
    from tests.toy import world_tokenizer

    table, tok = small_logs(small_world), world_tokenizer(small_world)
    source = tmp_path / "part-0.parquet"
    source.write_bytes(b"logs, version 1")
    first = encode_logs(table, tok, tmp_path / "cache", [source], progress=False)
    assert not first.from_cache and first.cache_dir.parent == tmp_path / "cache"
    monkeypatch.setattr(type(tok), "encode", lambda *a, **k: pytest.fail("encoded again"))
    again = encode_logs(table, tok, tmp_path / "cache", [source], progress=False)
    assert again.from_cache and again.cache_dir == first.cache_dir
    assert isinstance(again.prompts.values, np.memmap)
    assert [again.pages[i] for i in range(len(again))] == [first.pages[i] for i in range(len(first))]
    assert again.stats == first.stats
    monkeypatch.undo()
    source.write_bytes(b"logs, version 2")  # other log bytes, another entry
    other_logs = encode_logs(table, tok, tmp_path / "cache", [source], progress=False)
    other_tok = encode_logs(table, world_tokenizer(small_world, max_history=8), tmp_path / "cache", [source],
                            progress=False)
    assert len({first.cache_dir, other_logs.cache_dir, other_tok.cache_dir}) == 3
    assert not other_tok.from_cache and other_tok.prompts[0] != first.prompts[0]
    assert not list((tmp_path / "cache").glob(".tmp_*"))  # entries are renamed into place whole


def test_the_cached_encoding_is_written_chunk_by_chunk_and_equals_the_in_memory_one(small_world, tmp_path, monkeypatch):
    """Several chunks (ENCODE_CHUNK made small), joined on disk: every array equals the in-memory encoding's,
    offsets continue across chunks and the chunk files are gone."""
    import numpy as np

    import policies.data as data
    from tests.toy import world_tokenizer

    table, tok = small_logs(small_world), world_tokenizer(small_world)
    monkeypatch.setattr(data, "ENCODE_CHUNK", 7)  # 50 rows: 8 chunks, the last one short
    memory = data.encode_logs(table, tok, progress=False)
    cached = data.encode_logs(table, tok, tmp_path / "cache", progress=False)
    for name in ("values", "starts", "ends"):
        for seqs in ("prompts", "pages"):
            assert np.array_equal(getattr(getattr(cached, seqs), name), getattr(getattr(memory, seqs), name)), (seqs, name)
    for name in ("split", "user_ids", "page_reward"):
        assert np.array_equal(getattr(cached, name), getattr(memory, name)), name
    assert cached.stats == memory.stats and not list(cached.cache_dir.glob("chunks"))


def test_contains_any_by_chunks_equals_a_scan_of_each_list():
    import numpy as np

    from policies.data import TokenLists

    rng = np.random.default_rng(0)
    lists = TokenLists.from_lists([rng.integers(0, 30, rng.integers(0, 6)).tolist() for _ in range(200)])
    subset = lists.take(rng.permutation(200)[:150])  # lists out of order over the same values
    for seqs in (lists, subset):
        expected = [any(t in (3, 17) for t in seqs[i]) for i in range(len(seqs))]
        for chunk in (1, 7, 65_536):
            assert seqs.contains_any([3, 17], chunk=chunk).tolist() == expected
    assert 0 < sum(expected) < len(expected)
