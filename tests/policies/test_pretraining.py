"""The pretraining stage's package pieces: the cold-start title choice and the NaN-aware mean."""

import numpy as np
import pyarrow as pa

from policies.pretraining import nanmean, pick_cold_start_titles


def test_cold_start_titles_come_from_the_least_logged():
    # counts over pages and histories: a 3, b 2, c 1, d 0 ... t 0; the 10% rarest of 20 titles (at least n) are
    # the two with the fewest appearances, ties by id: d, e
    ids = ["a", "b", "c"] + [chr(ord("d") + i) for i in range(17)]
    table = pa.table({"page_entity_ids": [[["a", "b"], ["c"]], [["a"]]], "history_entity_ids": [["a", "b"], []]})
    assert pick_cold_start_titles(table, ids, 2, seed=0) == ["d", "e"]
    assert pick_cold_start_titles(table, ids, 0, seed=0) == []
    picked = pick_cold_start_titles(table, ids, 3, seed=1)  # n above 10%: the n rarest, all taken
    assert picked == ["d", "e", "f"]


def test_nanmean_skips_nans_and_says_none_when_nothing_is_left():
    assert nanmean([1.0, np.nan, 3.0]) == 2.0
    assert nanmean([np.nan, np.nan]) is None
