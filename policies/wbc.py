"""Weighted binary classification (WBC, paper section 5.2): GenPage post-trained as a per-token value model.

For every row token and every impressed title token of a logged page, the logit of that token at its position
(the next-token logit a causal LM already computes) is read as the model's value estimate of writing it there,
and trained with a per-token sigmoid: label 1 when the token's reward is positive, 0 otherwise, weighted by the
reward's magnitude. A title's reward is its logged entity reward; a row's is the sum of its titles' rewards.
What an impression with zero reward (shown, not played) counts for is `zero_reward`: "negative" (label 0 with
weight `zero_weight`: being shown and ignored is evidence against the token) or "ignore" (weight 0). Decoding a
WBC model is decoding any GenPage: the highest value under the rule masks (greedy) or a softmax over values.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from policies.data import PageSequences, pad_batch, split_logs

ZeroReward = Literal["negative", "ignore"]
ZERO_REWARDS: tuple[str, ...] = typing.get_args(ZeroReward)
NO_TARGET = -1.0  # label of positions without a target (prompt, [EOP], padding); their weight is 0


def token_targets(entity_rewards: list[list[float]], zero_reward: ZeroReward = "negative",
                  zero_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One logged page's [row][column] entity rewards -> (label, weight, is_row), each [L] aligned with
    GenPageTokenizer.encode_page (row token, its titles, ..., [EOP]). [EOP] gets no target (weight 0)."""
    if zero_reward not in ZERO_REWARDS:
        raise ValueError(f"zero_reward must be one of {list(ZERO_REWARDS)}, got {zero_reward!r}")
    rewards, is_row = [], []
    for row in entity_rewards:
        rewards += [float(sum(row)), *map(float, row)]
        is_row += [True] + [False] * len(row)
    r = np.asarray(rewards, dtype=np.float64)
    label = (r > 0).astype(np.float32)
    weight = np.where(r != 0, np.abs(r), zero_weight if zero_reward == "negative" else 0.0).astype(np.float32)
    return (np.append(label, NO_TARGET).astype(np.float32), np.append(weight, 0.0).astype(np.float32),
            np.append(np.asarray(is_row, dtype=bool), False))


@dataclass
class WbcData:
    """Encoded impressions of one split with a label and a weight per page token (NO_TARGET / 0 at [EOP])."""

    seqs: PageSequences
    labels: list[np.ndarray]  # N arrays [len(page)]
    weights: list[np.ndarray]
    is_row: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.seqs)

    def subset(self, idx) -> "WbcData":
        idx = list(idx)
        return WbcData(self.seqs.subset(idx), [self.labels[i] for i in idx], [self.weights[i] for i in idx],
                       [self.is_row[i] for i in idx])


def wbc_data(table: pa.Table, tok, split: str, zero_reward: ZeroReward, zero_weight: float) -> WbcData:
    """Every logged impression of `split` (positive or not: WBC learns from what was not engaged too)."""
    seqs, part = split_logs(table, tok, split)
    targets = [token_targets(r, zero_reward, zero_weight) for r in part.column("entity_rewards").to_pylist()]
    for i, (page, (label, _, _)) in enumerate(zip(seqs.pages, targets)):
        if len(page) != len(label):  # encode_page writes one token per row and per title, then [EOP]
            raise ValueError(f"impression {i} of split {split!r}: {len(page)} page tokens but {len(label)} targets")
    return WbcData(seqs, [t[0] for t in targets], [t[1] for t in targets], [t[2] for t in targets])


def collate_wbc(data: WbcData, idx) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T]; label, weight, is_row [B, T] at the position of each
    page token (NO_TARGET / 0 / False elsewhere)."""
    idx = list(idx)
    seqs = [data.seqs.prompts[i] + data.seqs.pages[i] for i in idx]
    ids, mask = pad_batch(seqs, 0)
    pre = [np.full(len(data.seqs.prompts[i]), NO_TARGET, np.float32) for i in idx]
    label, _ = pad_batch([np.concatenate([p, data.labels[i]]) for p, i in zip(pre, idx)], NO_TARGET, ids.shape[1],
                         torch.float32)
    weight, _ = pad_batch([np.concatenate([np.zeros_like(p), data.weights[i]]) for p, i in zip(pre, idx)], 0.0,
                          ids.shape[1], torch.float32)
    is_row, _ = pad_batch([np.concatenate([np.zeros(len(p), bool), data.is_row[i]]) for p, i in zip(pre, idx)], False,
                          ids.shape[1], torch.bool)
    return {"input_ids": ids, "attention_mask": mask, "label": label, "weight": weight, "is_row": is_row}


def token_values(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logit of each written token at its position: logits[b, t - 1, input_ids[b, t]].  -> [B, T] (0 at t=0)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    picked = logits[:, :-1].float().gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return F.pad(picked, (1, 0))


def weighted_bce(values: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed weighted BCE of sigmoid(values) against label, and the summed weight.  [...] x3 -> (scalar, scalar)"""
    bce = F.binary_cross_entropy_with_logits(values, label.clamp(min=0.0), reduction="none")
    return (weight * bce).sum(), weight.sum()


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Sample-weighted ROC AUC: over (positive i, negative j) pairs, sum w_i w_j ([s_i > s_j] + [s_i = s_j] / 2)
    divided by sum w_i * sum w_j. Ties by rank groups, O(n log n).  [n] x3 -> float (NaN without both classes)"""
    scores, labels, weights = (np.asarray(a, dtype=np.float64) for a in (scores, labels, weights))
    keep = weights > 0
    scores, pos, weights = scores[keep], labels[keep] > 0.5, weights[keep]
    w_pos, w_neg = weights[pos].sum(), weights[~pos].sum()
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    uniq, group = np.unique(scores, return_inverse=True)
    neg_in = np.bincount(group, weights=np.where(~pos, weights, 0.0), minlength=len(uniq))  # negative weight per score
    neg_below = np.concatenate([[0.0], np.cumsum(neg_in)[:-1]])  # negative weight strictly below each score
    credit = neg_below[group] + 0.5 * neg_in[group]
    return float((weights[pos] * credit[pos]).sum() / (w_pos * w_neg))


def evaluate_scores(values: np.ndarray, label: np.ndarray, weight: np.ndarray, is_row: np.ndarray) -> dict:
    """Table 1 of the paper on flat per-token arrays: weighted BCE, sample-weighted row AUC and entity AUC."""
    on = weight > 0
    bce, w = weighted_bce(torch.from_numpy(values[on]), torch.from_numpy(label[on]), torch.from_numpy(weight[on]))
    rows, ents = on & is_row, on & ~is_row
    return {"weighted_bce": float(bce / w), "row_auc": weighted_auc(values[rows], label[rows], weight[rows]),
            "entity_auc": weighted_auc(values[ents], label[ents], weight[ents])}


@torch.no_grad()
def score_tokens(model, data: WbcData, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The model's value of every targeted page token of `data`, flat, with its label, weight and kind."""
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("values", "label", "weight", "is_row")}
    for s in range(0, len(data), batch_size):
        batch = collate_wbc(data, range(s, min(s + batch_size, len(data))))
        values = token_values(model, batch)
        on = batch["weight"] > 0
        out["values"].append(values[on].numpy())
        for k in ("label", "weight", "is_row"):
            out[k].append(batch[k][on].numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}


def popularity_scores(train: WbcData, data: WbcData) -> dict[str, np.ndarray]:
    """A baseline scorer: each token's weighted positive rate in train (as log-odds, smoothed), on `data`'s tokens."""
    pos: dict[int, float] = {}
    tot: dict[int, float] = {}
    for page, label, weight in zip(train.seqs.pages, train.labels, train.weights):
        for t, y, w in zip(page, label, weight):
            if w > 0:
                pos[t] = pos.get(t, 0.0) + w * y
                tot[t] = tot.get(t, 0.0) + w
    prior = sum(pos.values()) / max(sum(tot.values()), 1e-9)
    out = {k: [] for k in ("values", "label", "weight", "is_row")}
    for page, label, weight, is_row in zip(data.seqs.pages, data.labels, data.weights, data.is_row):
        on = weight > 0
        rate = np.array([(pos.get(t, 0.0) + prior) / (tot.get(t, 0.0) + 1.0) for t in page])
        out["values"].append(np.log(rate / (1 - rate + 1e-9) + 1e-9)[on])
        for k, v in (("label", label), ("weight", weight), ("is_row", is_row)):
            out[k].append(v[on])
    return {k: np.concatenate(v) for k, v in out.items()}
