import numpy as np
import pyarrow as pa
import pytest
import torch

from homepage.logs import Context, Impression
from homepage.pages import Page, Row
from homepage.rewards import FEEDBACK_TYPES
from policies.data import PageSequences
from policies.tokenizer import EncodeStats
from reward_model.data import (RewardNormalization, check_disjoint_users, collate_pages, collate_token_targets, entity_targets,
                               page_token_rewards, same_user_pairs, with_eop)
from tests.toy import toy_tokenizer

TOK = toy_tokenizer(["movie_0000", "show_0001", "game_0002"])


def seqs(users: list[str]) -> PageSequences:
    return PageSequences([[1]] * len(users), [[2]] * len(users), users, np.zeros(len(users), np.float32), EncodeStats())


def test_pages_get_eop_once_and_batches_are_right_padded():
    e = TOK.eop_id
    assert with_eop([10, 11], e) == [10, 11, e] and with_eop([10, e], e) == [10, e]
    batch = collate_pages([[1, 3], [1, 4, 5, 3]], [[10], [11, e]], TOK.pad_id, e)
    # lengths 2 + 2 (eop appended) = 4 and 4 + 2 = 6
    assert batch["input_ids"].tolist() == [[1, 3, 10, e, TOK.pad_id, TOK.pad_id], [1, 4, 5, 3, 11, e]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def test_same_user_pairs_chain_each_users_impressions_in_log_order():
    # u1 at 0, 2, 3 -> (0, 2), (2, 3); u2 at 1, 4 -> (1, 4); u3 once -> no pair
    a, b = same_user_pairs(["u1", "u2", "u1", "u1", "u2", "u3"])
    assert a.tolist() == [0, 2, 1] and b.tolist() == [2, 3, 4]


def test_user_overlap_between_splits_is_an_error():
    check_disjoint_users(seqs(["a", "b"]), seqs(["c"]))
    with pytest.raises(ValueError, match="both the train and valid splits"):
        check_disjoint_users(seqs(["a", "b"]), seqs(["b"]))


def test_normalization_round_trip():
    norm = RewardNormalization.fit(np.array([1.0, 3.0, 5.0]))  # mean 3, std sqrt(8/3)
    assert norm.mean == 3.0 and abs(norm.std - np.sqrt(8 / 3)) < 1e-12
    np.testing.assert_allclose(norm.denormalize(norm.normalize(np.array([7.0, -1.0]))), [7.0, -1.0])
    assert RewardNormalization.fit(np.array([2.0, 2.0])).std == 1.0  # constant rewards: no division by zero


def test_entity_rewards_line_up_with_page_tokens():
    page = Page((Row("trending", ("movie_0000", "show_0001")), Row("kids", ("game_0002",))))
    imp = Impression(0, "train", Context("u", "en", "adult", 20, 1, "tv", ()), page, (), (), (),
                     ((2.0, 0.0), (4.5,)), 6.5)
    _, page_ids = TOK.encode(imp)
    table = pa.table({"entity_rewards": [[[2.0, 0.0], [4.5]]]})
    (targets,) = page_token_rewards(table)
    # row:trending ent ent row:kids ent [EOP]
    assert len(targets) == len(page_ids) == 6
    np.testing.assert_array_equal(targets, [np.nan, 2.0, 0.0, np.nan, 4.5, np.nan])
    placed = collate_token_targets([[1, 3]], [targets], T=9)  # prompt of 2 tokens, then the page, then padding
    assert placed.shape == (1, 9) and placed[0, 3].item() == 2.0 and placed[0, 6].item() == 4.5
    assert torch.isnan(placed[0, [0, 1, 2, 5, 7, 8]]).all()


def feedback_table(rewards_of_first_title: float = 2.5) -> pa.Table:
    """Two impressions under the default reward system (none 0, abandon -1, short 0.5, long 2, binge 4,
    thumbs-up +0.5): page 0 has rows [long+thumbs, none] and [binge]; page 1 [abandon, short, long]."""
    return pa.table({
        "impression_id": [7, 8],
        "feedback": [[["long_play", "none"], ["binge"]], [["abandon", "short_play", "long_play"]]],
        "thumbs_up": [[[True, False], [False]], [[False, False, False]]],
        "entity_rewards": [[[rewards_of_first_title, 0.0], [4.0]], [[-1.0, 0.5, 2.0]]],
    })


def test_entity_targets_line_up_with_page_tokens_and_read_the_reward_system_off_the_logs():
    targets = entity_targets(feedback_table(), "logs/", FEEDBACK_TYPES)
    # page 0: row:a ent ent row:b ent [EOP]; page 1: row ent ent ent [EOP]
    np.testing.assert_array_equal(targets.feedback[0], [np.nan, 3, 0, np.nan, 4, np.nan])
    np.testing.assert_array_equal(targets.thumbs[0], [np.nan, 1, 0, np.nan, 0, np.nan])
    np.testing.assert_array_equal(targets.reward[1], [np.nan, -1.0, 0.5, 2.0, np.nan])
    np.testing.assert_allclose(targets.feedback_rewards, [0.0, -1.0, 0.5, 2.0, 4.0], atol=1e-9)
    assert targets.thumbs_up_reward == pytest.approx(0.5)
    assert targets.feedback_counts == [1, 1, 1, 2, 1] and targets.thumbs_up_count == 1
    rates, thumbs = targets.base_rates()
    np.testing.assert_allclose(rates, [1 / 6, 1 / 6, 1 / 6, 2 / 6, 1 / 6])
    assert thumbs == pytest.approx(1 / 6)


def test_entity_targets_refuse_rewards_that_are_not_a_function_of_the_feedback():
    table = pa.concat_tables([feedback_table(), feedback_table(rewards_of_first_title=3.5).set_column(
        0, "impression_id", pa.array([9, 10]))])  # impression 9: the same long play + thumbs-up gets 3.5, not 2.5
    with pytest.raises(ValueError, match=r"logs/: .*not a function of \(feedback, thumbs_up\).*impression_id (7|9).*"
                                         r"reward_head=entity_sum"):
        entity_targets(table, "logs/", FEEDBACK_TYPES)


def test_per_token_targets_of_a_whole_log_are_the_cell_by_cell_ones(small_world):
    """The flat-array construction against the obvious loop over each page's rows, on a simulated log."""
    import pyarrow as pa

    from homepage.logs import batch_to_table
    from reward_model.data import page_token_rewards

    table = pa.concat_tables([batch_to_table(b, small_world) for b in small_world.iter_logs(500)])
    by_hand = [np.asarray([v for row in page for v in (np.nan, *row)] + [np.nan], np.float32)
               for page in table.column("entity_rewards").to_pylist()]
    got = page_token_rewards(table)
    assert len(got) == len(by_hand) == 500
    for a, b in zip(got, by_hand):
        np.testing.assert_array_equal(a, b)


def test_the_reward_system_fit_on_feedback_combinations_is_the_per_title_least_squares(small_world):
    """entity_targets fits on the distinct (feedback, thumbs_up) combinations weighted by count; the per-title
    least squares on the explicit [titles, F + 1] design gives the same coefficients."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from homepage.logs import batch_to_table

    table = pa.concat_tables([batch_to_table(b, small_world) for b in small_world.iter_logs(500)])
    types = sorted(set(pc.list_flatten(pc.list_flatten(table.column("feedback"))).to_pylist()))
    targets = entity_targets(table, "logs/", tuple(types))
    leaves = lambda c: pc.list_flatten(pc.list_flatten(table.column(c))).to_pylist()  # noqa: E731
    X = np.array([[float(f == t) for t in types] + [float(u)] for f, u in zip(leaves("feedback"), leaves("thumbs_up"))])
    coef = np.linalg.lstsq(X, np.array(leaves("entity_rewards"), np.float64), rcond=None)[0]
    np.testing.assert_allclose([*targets.feedback_rewards, targets.thumbs_up_reward], coef, atol=1e-9)
    assert len(X) > 1000 and targets.thumbs_up_count > 0
