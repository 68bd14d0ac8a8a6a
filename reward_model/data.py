"""Reward-model data: logged impressions split by user, right-padded scoring batches, target normalization,
and the same-context page pairs the ground-truth ordering is judged on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from policies.data import PageSequences, encode_table
from policies.tokenizer import GenPageTokenizer


@dataclass(frozen=True)
class RewardNormalization:
    """Standardization of the page-reward target (fitted on training impressions, stored in the checkpoint
    config as `reward_mean` / `reward_std`, so scores come back in reward units)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, page_reward: np.ndarray) -> "RewardNormalization":
        std = float(np.std(page_reward))
        return cls(float(np.mean(page_reward)), std if std > 1e-8 else 1.0)

    def normalize(self, page_reward):
        return (page_reward - self.mean) / self.std

    def denormalize(self, score):
        return score * self.std + self.mean


def split_logs(table: pa.Table, tok: GenPageTokenizer, split: str) -> tuple[PageSequences, pa.Table]:
    """One split of validated logs (all impressions, positive or not), encoded; the table rows stay aligned
    with the sequences (row i of the returned table is sequence i), for the ground truth."""
    part = table.filter(pc.equal(table.column("split"), split))
    seqs, _ = encode_table(part, tok)
    return seqs, part


def check_disjoint_users(train: PageSequences, valid: PageSequences) -> None:
    """The validation users must be unseen in training (the evaluation is on held-out users)."""
    shared = set(train.user_ids) & set(valid.user_ids)
    if shared:
        raise ValueError(f"{len(shared)} user(s) appear in both the train and valid splits, e.g. {sorted(shared)[:3]}; "
                         "the logs' `split` column must assign each user to one split")


def with_eop(page: list[int], eop_id: int) -> list[int]:
    """The head reads the end-of-page position, so every scored page ends with [EOP]."""
    return page if page and page[-1] == eop_id else [*page, eop_id]


def collate_pages(prompts: list[list[int]], pages: list[list[int]], pad_id: int, eop_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (context + page) batch: input_ids [B, T], attention_mask [B, T]. Pages get [EOP]
    appended when it is missing."""
    seqs = [p + with_eop(g, eop_id) for p, g in zip(prompts, pages)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def same_user_pairs(user_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of a user's consecutive logged impressions, in log order: a user with k impressions
    gives k - 1 pairs. The pair is judged under impression a's context (user and request): page a was built
    for it, page b for another request of the same user.  -> (a [P], b [P]) indices"""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(user_ids):
        by_user.setdefault(u, []).append(i)
    a = [idx[k] for idx in by_user.values() for k in range(len(idx) - 1)]
    b = [idx[k + 1] for idx in by_user.values() for k in range(len(idx) - 1)]
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def page_token_rewards(table: pa.Table) -> list[np.ndarray]:
    """Per impression, the logged entity reward of each page token (NaN at row tokens and [EOP]), aligned
    with GenPageTokenizer.encode_page (row token, its entities, ..., [EOP]).  -> N arrays [len(page)]"""
    out = []
    for rows in table.column("entity_rewards").to_pylist():
        vals = [v for row in rows for v in (float("nan"), *row)]
        out.append(np.asarray([*vals, float("nan")], dtype=np.float32))
    return out


def collate_token_targets(prompts: list[list[int]], token_targets: list[np.ndarray], T: int) -> torch.Tensor:
    """Per-token targets placed at their page positions of a right-padded batch of width T, NaN elsewhere
    (prompt, row tokens, [EOP], padding).  -> [B, T]"""
    out = torch.full((len(prompts), T), float("nan"))
    for i, (p, t) in enumerate(zip(prompts, token_targets)):
        out[i, len(p):len(p) + len(t)] = torch.from_numpy(t)
    return out


def check_page_rewards(table: pa.Table, path) -> None:
    """The regression target must be a finite number on every row. (read_logs compares each page reward
    with the sum of its entity rewards, a comparison a NaN page reward passes.) Raises LogSchemaError naming
    the row (counted over the files in name order) and its impression id."""
    from homepage.logs import LogSchemaError

    reward = table.column("page_reward").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(reward))
    if len(bad):
        r = int(bad[0])
        raise LogSchemaError(f"{path}: row {r} (impression_id {table.column('impression_id')[r].as_py()}), field "
                             f"'page_reward': {reward[r]} is not a finite number ({len(bad)} such rows); fix or drop them")
