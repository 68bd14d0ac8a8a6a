"""Token sequences from impression logs: (prompt ids, page ids) pairs and padded training batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from homepage.logs import iter_impressions
from policies.tokenizer import EncodeStats, GenPageTokenizer

IGNORE_INDEX = -100  # labels of prompt and padding positions (no loss)


@dataclass
class PageSequences:
    """Encoded impressions. prompts[i] ends with [PAGE]; pages[i] ends with [EOP]."""

    prompts: list[list[int]]
    pages: list[list[int]]
    user_ids: list[str]
    page_reward: np.ndarray  # [N] observed page reward
    stats: EncodeStats

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx) -> "PageSequences":
        idx = list(idx)
        return PageSequences(
            [self.prompts[i] for i in idx], [self.pages[i] for i in idx], [self.user_ids[i] for i in idx],
            self.page_reward[idx], self.stats,
        )


def encode_table(table: pa.Table, tok: GenPageTokenizer, split: str | None = None, min_page_reward: float | None = None,
                 exclude_entities: frozenset[str] = frozenset()) -> tuple[PageSequences, dict[str, int]]:
    """Encodes logged impressions, optionally one split, positive pages only, or without some titles.

    Returns the sequences and counts of impressions left out by each filter (reported, never silent).
    """
    skipped = {"other_split": 0, "not_positive": 0, "holds_excluded_title": 0}
    stats = EncodeStats()
    prompts, pages, users, rewards = [], [], [], []
    for imp in iter_impressions(table):
        if split is not None and imp.split != split:
            skipped["other_split"] += 1
            continue
        if min_page_reward is not None and imp.page_reward <= min_page_reward:
            skipped["not_positive"] += 1
            continue
        if exclude_entities and (
            exclude_entities.intersection(imp.page.entity_ids)
            or exclude_entities.intersection(h.entity_id for h in imp.context.history)
        ):
            skipped["holds_excluded_title"] += 1
            continue
        p, g = tok.encode(imp, stats)
        prompts.append(p)
        pages.append(g)
        users.append(imp.context.user_id)
        rewards.append(imp.page_reward)
    return PageSequences(prompts, pages, users, np.asarray(rewards, dtype=np.float32), stats), skipped


def split_logs(table: pa.Table, tok: GenPageTokenizer, split: str) -> tuple[PageSequences, pa.Table]:
    """One split of validated logs (all impressions, positive or not), encoded; the table rows stay aligned
    with the sequences (row i of the returned table is sequence i), for the ground truth and per-token targets."""
    part = table.filter(pc.equal(table.column("split"), split))
    seqs, _ = encode_table(part, tok)
    return seqs, part


def pad_batch(seqs: Sequence[Sequence], pad_id: int | float, length: int | None = None, dtype: torch.dtype = torch.long,
              side: Literal["right", "left"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths (lists or numpy arrays) as one batch, each padded with pad_id after it
    (side="right": training, scoring, log-probs) or before it ("left": a prompt batch to generate from).

    length: the batch width T (at least the longest sequence); None: the longest sequence.
    -> (values [B, T] of dtype, attention_mask [B, T] long: 1 on each sequence's own positions)"""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # [B]
    longest = int(lengths.max()) if len(seqs) else 0
    T = longest if length is None else length
    if T < longest:
        raise ValueError(f"pad_batch: a sequence of {longest} tokens does not fit length={T}")
    pos = torch.arange(T)[None, :]  # [1, T]
    mask = pos < lengths[:, None] if side == "right" else pos >= T - lengths[:, None]  # [B, T]
    out = torch.full((len(seqs), T), pad_id, dtype=dtype)
    if len(seqs):  # the True positions of mask, row by row, are the sequences' values in order
        out[mask] = torch.cat([torch.as_tensor(s, dtype=dtype) for s in seqs])
    return out, mask.long()


def collate(prompts: list[list[int]], pages: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on page tokens only (paper section 5.1: the context is the prompt).

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (IGNORE_INDEX outside pages).
    """
    ids, mask = pad_batch([p + g for p, g in zip(prompts, pages)], pad_id)
    labels, _ = pad_batch([[IGNORE_INDEX] * len(p) + g for p, g in zip(prompts, pages)], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def page_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of page tokens and their count.  -> (scalar, scalar)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    targets = batch["labels"][:, 1:]  # [B, T-1]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = targets != IGNORE_INDEX
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (nll * valid).sum(), valid.sum()
