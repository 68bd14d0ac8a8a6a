"""Judging generated pages on the world's ground truth, and the token-level baselines for page loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from homepage.catalog import ROW_IDS
from homepage.pages import Page, PageBatch, Row
from policies.tokenizer import KIND_ENTITY, KIND_ROW, GenPageTokenizer


@dataclass
class DecodeReport:
    """What had to be cleaned from generated pages before the ground truth could score them."""

    pages: int = 0
    without_eop: int = 0  # generation hit max_tokens
    fallback_entities: int = 0  # entity fallback tokens (no real title): dropped
    fallback_rows: int = 0  # row:<unk>: row dropped
    empty_rows: int = 0  # a row token followed by no entity: dropped
    counts: dict[str, int] = field(default_factory=dict)


def pages_from_tokens(tok: GenPageTokenizer, page_tokens: list[list[int]], entity_index: dict[str, int]) -> tuple[PageBatch, DecodeReport]:
    """Generated page token ids -> PageBatch the simulator can score (duplicates and misplaced titles are
    kept: the world's behaviour model penalizes them itself)."""
    report = DecodeReport(pages=len(page_tokens))
    pages = []
    for ids in page_tokens:
        if tok.eop_id not in ids:
            report.without_eop += 1
        page = tok.decode(ids, strict=False)
        rows = []
        for row in page.rows:
            if row.row_id not in ROW_IDS:
                report.fallback_rows += 1
                continue
            ents = tuple(e for e in row.entity_ids if e in entity_index)
            report.fallback_entities += len(row.entity_ids) - len(ents)
            if not ents:
                report.empty_rows += 1
                continue
            rows.append(Row(row.row_id, ents))
        pages.append(Page(tuple(rows)))
    return PageBatch.from_pages(pages, entity_index), report


def page_token_mask(tok: GenPageTokenizer) -> np.ndarray:
    """[V] bool: tokens that can appear in a page."""
    m = (tok.token_kind == KIND_ROW) | (tok.token_kind == KIND_ENTITY)
    m[tok.eop_id] = True
    return m


def unigram_page_loss(tok: GenPageTokenizer, train_pages: list[list[int]], eval_pages: list[list[int]]) -> float:
    """Mean NLL (nats/token) of eval page tokens under add-one smoothed training page-token frequencies."""
    allowed = page_token_mask(tok)
    counts = np.bincount(np.concatenate(train_pages), minlength=len(tok)).astype(np.float64) + allowed
    p = np.where(allowed, counts, 0) / (counts * allowed).sum()
    flat = np.concatenate(eval_pages)
    return float(-np.log(p[flat]).mean())


def popularity_page_loss(tok: GenPageTokenizer, train_pages: list[list[int]], eval_pages: list[list[int]]) -> float:
    """Mean NLL of a structure-aware popularity model: the kind of the next token (row / entity / end)
    from the previous token's kind and the row's length so far, then the row or entity by its training
    popularity among those not yet on the page (add-one smoothed)."""
    kind = tok.token_kind
    token_pop = np.bincount(np.concatenate(train_pages), minlength=len(tok)).astype(np.float64) + 1.0
    is_row, is_ent = kind == KIND_ROW, kind == KIND_ENTITY

    def state(prev_kind: int, run: int) -> tuple[int, int]:
        return prev_kind, min(run, 9)

    # Next-kind counts per state: 0 row, 1 entity, 2 end.
    trans: dict[tuple[int, int], np.ndarray] = {}
    for page in train_pages:
        prev, run = -1, 0
        for t in page:
            nxt = 2 if t == tok.eop_id else (0 if is_row[t] else 1)
            trans.setdefault(state(prev, run), np.ones(3))[nxt] += 1
            prev, run = (KIND_ROW, 0) if nxt == 0 else (KIND_ENTITY, run + 1) if nxt == 1 else (prev, run)
    nll, n = 0.0, 0
    for page in eval_pages:
        prev, run = -1, 0
        used = np.zeros(len(tok), dtype=bool)
        for t in page:
            p_kind = trans.get(state(prev, run), np.ones(3))
            p_kind = p_kind / p_kind.sum()
            nxt = 2 if t == tok.eop_id else (0 if is_row[t] else 1)
            if nxt == 2:
                p = p_kind[2]
            else:
                pool = (is_row if nxt == 0 else is_ent) & ~used
                p = p_kind[nxt] * token_pop[t] / token_pop[pool].sum() if pool[t] else p_kind[nxt] * 1e-6
            nll -= np.log(p)
            n += 1
            used[t] = True
            prev, run = (KIND_ROW, 0) if nxt == 0 else (KIND_ENTITY, run + 1) if nxt == 1 else (prev, run)
    return float(nll / n)
