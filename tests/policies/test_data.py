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
