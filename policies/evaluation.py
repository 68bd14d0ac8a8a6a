"""Generated pages as structured pages (for an environment's ground truth and offline metrics), the recall of
logged engaged titles, and the token-level baselines for page loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from homepage.pages import Page, Row
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


def pages_from_tokens(tok: GenPageTokenizer, page_tokens: list[list[int]]) -> tuple[list[Page], DecodeReport]:
    """Generated page token ids -> pages of catalog titles and known rows (fallback tokens dropped and counted;
    duplicates and misplaced titles are kept: judging them is the environment's business)."""
    report = DecodeReport(pages=len(page_tokens))
    known_rows, entity_index = set(tok.row_ids), set(tok.entity_ids)
    pages = []
    for ids in page_tokens:
        if tok.eop_id not in ids:
            report.without_eop += 1
        page = tok.decode(ids, strict=False)
        rows = []
        for row in page.rows:
            if row.row_id not in known_rows:
                report.fallback_rows += 1
                continue
            ents = tuple(e for e in row.entity_ids if e in entity_index)
            report.fallback_entities += len(row.entity_ids) - len(ents)
            if not ents:
                report.empty_rows += 1
                continue
            rows.append(Row(row.row_id, ents))
        pages.append(Page(tuple(rows)))
    return pages, report


def engaged_recall(pages: list[Page], engaged: list[set[str]]) -> np.ndarray:
    """[B] share of each held-out impression's engaged titles (entity reward > 0) that page b shows, NaN where the
    impression has none: the offline hit-rate generative recommenders report (HR@K, K = the page)."""
    out = np.full(len(pages), np.nan)
    for b, (page, want) in enumerate(zip(pages, engaged)):
        if want:
            out[b] = len(want & set(page.entity_ids)) / len(want)
    return out


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
