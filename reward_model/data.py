"""Reward-model data: logged impressions split by user, right-padded scoring batches, target normalization,
and the same-context page pairs the ground-truth ordering is judged on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from policies.data import PageSequences, pad_batch


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


def check_disjoint_users(train: PageSequences, valid: PageSequences) -> None:
    """The validation users must be unseen in training (the evaluation is on held-out users)."""
    shared = set(train.user_ids) & set(valid.user_ids)
    if shared:
        raise ValueError(f"{len(shared)} user(s) appear in both the train and valid splits, e.g. {sorted(shared)[:3]}; "
                         "the logs' `split` column must assign each user to one split")


def with_eop(page: list[int], eop_id: int) -> list[int]:
    """Every scored page ends with [EOP], as in training: the per-token heads give it a reward of its own, the
    "last" head reads its position."""
    return page if page and page[-1] == eop_id else [*page, eop_id]


def collate_pages(prompts: list[list[int]], pages: list[list[int]], pad_id: int, eop_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (context + page) batch: input_ids [B, T], attention_mask [B, T]. Pages get [EOP]
    appended when it is missing."""
    ids, mask = pad_batch([p + with_eop(g, eop_id) for p, g in zip(prompts, pages)], pad_id)
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


def _per_token(table: pa.Table, column: str, values: np.ndarray) -> list[np.ndarray]:
    """A [row][column] log column as per-impression page-token arrays, aligned with GenPageTokenizer.encode_page
    (row token, its titles, ..., [EOP]): each title's value, NaN at row tokens and [EOP]. values: the column's
    cells flattened, as numbers. Built on flat arrays (no Python object per cell: 200 M cells at medium scale);
    the result is views of one float32 array.  -> N arrays [len(page)]"""
    from homepage.validation import list_lengths

    col = table.column(column)
    rows_per_page = list_lengths(col)  # [N]
    titles_per_row = list_lengths(pc.list_flatten(col))  # [R] all pages' rows in order
    page_of_row = np.repeat(np.arange(len(rows_per_page)), rows_per_page)
    block = titles_per_row + 1  # the row token and its titles
    row_start = np.cumsum(block) - block + page_of_row  # every earlier page also holds its [EOP]
    first_title = np.cumsum(titles_per_row) - titles_per_row
    leaf_row = np.repeat(np.arange(len(titles_per_row)), titles_per_row)
    leaf_pos = row_start[leaf_row] + 1 + np.arange(len(leaf_row)) - first_title[leaf_row]
    page_len = np.bincount(page_of_row, weights=block, minlength=len(rows_per_page)).astype(np.int64) + 1
    out = np.full(int(page_len.sum()), np.nan, dtype=np.float32)
    out[leaf_pos] = values
    return np.split(out, np.cumsum(page_len)[:-1])


def _leaves(table: pa.Table, column: str):
    return pc.list_flatten(pc.list_flatten(table.column(column)))


def page_token_rewards(table: pa.Table) -> list[np.ndarray]:
    """Per impression, the logged entity reward of each page token (NaN at row tokens and [EOP]), aligned
    with GenPageTokenizer.encode_page (row token, its entities, ..., [EOP]).  -> N arrays [len(page)]"""
    return _per_token(table, "entity_rewards", _leaves(table, "entity_rewards").to_numpy(zero_copy_only=False))


REWARD_SYSTEM_TOLERANCE = 1e-3  # |logged entity reward - fitted reward of its feedback| allowed (float32 logs)


@dataclass
class EntityTargets:
    """Per train impression, the logged outcome of each page token, aligned with GenPageTokenizer.encode_page
    (NaN at row tokens and [EOP]), and the reward system read off the same logs.

    reward, feedback, thumbs: N arrays [len(page)] float32: the entity reward; the feedback-type index into
        homepage.rewards.FEEDBACK_TYPES; the thumbs-up (0 / 1).
    feedback_rewards [F], thumbs_up_reward: the reward of each feedback type and of a thumbs-up, such that
        entity reward = feedback_rewards[feedback] + thumbs_up_reward * thumbs_up on every logged title.
    feedback_counts [F], thumbs_up_count: how often each was logged (a type never logged gets reward 0).
    """

    reward: list[np.ndarray]
    feedback: list[np.ndarray]
    thumbs: list[np.ndarray]
    feedback_rewards: list[float]
    thumbs_up_reward: float
    feedback_counts: list[int]
    thumbs_up_count: int

    def base_rates(self) -> tuple[np.ndarray, float]:
        """(share of each feedback type [F], share of titles with a thumbs-up) over the logged titles."""
        titles = max(sum(self.feedback_counts), 1)
        return np.asarray(self.feedback_counts, np.float64) / titles, self.thumbs_up_count / titles


ENTITY_TARGET_COLUMNS = ("impression_id", "feedback", "thumbs_up", "entity_rewards")  # what entity_targets reads


def entity_targets(table: pa.Table, source, feedback_types: tuple[str, ...]) -> EntityTargets:
    """The per-token targets of `table`'s impressions and the reward system that turned their feedback into
    entity rewards, fitted by least squares (entity_reward ~ one-hot(feedback) + thumbs_up). source names the
    logs in errors. Raises ValueError naming an impression when the logged rewards are not a function of
    (feedback, thumbs_up): a reward system that also uses e.g. play minutes needs reward_head=entity_sum.
    Where two parts never occur apart (say, thumbs-ups only on long plays), their split is the least-norm
    one; the rewards of every logged combination are still reproduced exactly. feedback_types: the dataset's, in
    its reward table's order (the head's outputs)."""
    from homepage.validation import row_of_leaf

    feedback_types = tuple(feedback_types)
    feedback_index = {name: i for i, name in enumerate(feedback_types)}
    cells = pc.dictionary_encode(_leaves(table, "feedback")).combine_chunks()  # each title's feedback, coded
    unknown = [v for v in cells.dictionary.to_pylist() if v not in feedback_index]
    if unknown:
        raise ValueError(f"{source}: feedback {unknown[0]!r} is not one of the dataset's types {list(feedback_types)}")
    code_of = np.array([feedback_index[v] for v in cells.dictionary.to_pylist()], dtype=np.int64)
    codes = code_of[cells.indices.to_numpy(zero_copy_only=False)]  # [L] every logged title, in order
    up = _leaves(table, "thumbs_up").to_numpy(zero_copy_only=False).astype(np.int64)  # [L]
    y = _leaves(table, "entity_rewards").to_numpy(zero_copy_only=False).astype(np.float64)  # [L]
    reward = _per_token(table, "entity_rewards", y)
    feedback = _per_token(table, "feedback", codes)
    thumbs = _per_token(table, "thumbs_up", up)
    F = len(feedback_types)
    # The fit runs on the distinct (feedback, thumbs_up) combinations, weighted by their counts: the normal
    # equations are those of the per-title least squares (X^T X and X^T y are sums over titles), without an
    # [titles, F + 1] design matrix.
    combo, of_title = np.unique(codes * 2 + up, return_inverse=True)  # [K] distinct combinations, [L] each title's
    n = np.bincount(of_title, minlength=len(combo)).astype(np.float64)  # [K]
    X = np.zeros((len(combo), F + 1))
    X[np.arange(len(combo)), combo // 2] = 1.0
    X[:, F] = combo % 2
    mean = np.bincount(of_title, weights=y, minlength=len(combo)) / np.maximum(n, 1)  # [K]
    w = np.sqrt(n)[:, None]
    coef = np.linalg.lstsq(X * w, mean * w[:, 0], rcond=None)[0] if len(y) else np.zeros(F + 1)  # [F + 1]
    residual = np.abs((X @ coef)[of_title] - y)  # [L]
    if len(y) and residual.max() > REWARD_SYSTEM_TOLERANCE:
        worst = int(residual.argmax())
        row = row_of_leaf(table, "entity_rewards", 2, worst)  # the impression holding that title
        raise ValueError(
            f"{source}: the entity rewards are not a function of (feedback, thumbs_up): impression_id "
            f"{table.column('impression_id')[row].as_py()} has an entity reward {y[worst]:.4f} where its feedback "
            f"{feedback_types[codes[worst]]!r} (thumbs_up {bool(up[worst])}) gets {X[of_title[worst]] @ coef:.4f} "
            "elsewhere. The entity_feedback head needs one reward per feedback type; train with reward_head=entity_sum")
    counts = np.bincount(codes, minlength=F)
    return EntityTargets(reward, feedback, thumbs, [float(v) for v in coef[:F]], float(coef[F]),
                         [int(c) for c in counts], int(up.sum()))


def collate_token_targets(prompts: list[list[int]], token_targets: list[np.ndarray], T: int) -> torch.Tensor:
    """Per-token targets placed at their page positions of a right-padded batch of width T, NaN elsewhere
    (prompt, row tokens, [EOP], padding).  -> [B, T]"""
    placed = [np.concatenate([np.full(len(p), np.nan, np.float32), t]) for p, t in zip(prompts, token_targets)]
    return pad_batch(placed, float("nan"), length=T, dtype=torch.float32)[0]
