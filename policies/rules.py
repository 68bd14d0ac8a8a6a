"""Business rules as an allowed-token mask for the next page token (paper section 6.3), step by step.

A first, pure-numpy engine for one (prompt, page prefix) at a time: structure (row then entities, row and page
length bounds, [EOP]), deduplication (no entity or row twice), category consistency (genre rows hold titles
of that genre; Continue Watching only titles partially watched in the prompt's history; New Releases only new
titles; Kids only kids-safe titles) and maturity (kids profiles see only kids-safe titles). Rows are only
opened when enough eligible titles remain to fill them, so a mask never dead-ends.

Not here yet (issue: business rules): per-rule enforcement modes, pinned and business-critical rows, the
vectorized all-positions mask, the vLLM logits processor and mask replay in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from homepage.catalog import CONTINUE_WATCHING, KIDS, NEW_RELEASES, ROW_IDS, TRENDING
from policies.tokenizer import DURATION_BUCKET_EDGES, KIND_ENTITY, KIND_ROW, GenPageTokenizer

PARTIAL_DURATION_BUCKETS = tuple(f"db:{i}" for i in range(1, len(DURATION_BUCKET_EDGES)))  # 5%..90% watched


@dataclass(frozen=True)
class PageShape:
    """Structure bounds of a page."""

    min_rows: int = 3
    max_rows: int = 6
    min_row_len: int = 3
    max_row_len: int = 8


class RuleEngine:
    """Allowed-token masks over the tokenizer's vocabulary for one page being written."""

    def __init__(self, tok: GenPageTokenizer, catalog_path: str | Path, new_title_days: int = 30,
                 shape: PageShape = PageShape(), trending: set[str] | None = None):
        self.tok, self.shape = tok, shape
        table = pq.read_table(catalog_path, columns=["entity_id", "genres", "maturity", "release_day"]).to_pylist()
        V = len(tok)
        self.is_row = tok.token_kind == KIND_ROW
        self.is_row[tok.row_fallback_id] = False
        self.row_of = {tok.vocab[f"row:{r}"]: r for r in ROW_IDS}
        self.row_elig: dict[str, np.ndarray] = {r: np.zeros(V, dtype=bool) for r in ROW_IDS}
        self.kids_safe = np.zeros(V, dtype=bool)
        self.is_entity = np.zeros(V, dtype=bool)
        for row in table:
            t = tok.vocab.get(f"ent:{row['entity_id']}")
            if t is None:
                continue
            self.is_entity[t] = True
            for g in row["genres"]:
                self.row_elig[f"genre_{g}"][t] = True
            self.row_elig[CONTINUE_WATCHING][t] = True  # narrowed per prompt
            self.row_elig[TRENDING][t] = trending is None or row["entity_id"] in trending
            self.row_elig[NEW_RELEASES][t] = row["release_day"] > -new_title_days
            self.kids_safe[t] = row["maturity"] == "kids"
        self.row_elig[KIDS] = self.kids_safe.copy()
        self._partial = {tok.vocab[t] for t in PARTIAL_DURATION_BUCKETS}
        self._kids_token = tok.vocab["ptype:kids"]

    def prompt_facts(self, prompt: list[int]) -> tuple[np.ndarray, bool]:
        """(resumable [V] bool: titles partially watched in the history, is_kids_profile)."""
        resumable = np.zeros(len(self.tok), dtype=bool)
        kind = self.tok.token_kind
        for j, t in enumerate(prompt[:-3]):
            if kind[t] == KIND_ENTITY and prompt[j + 3] in self._partial and self.is_entity[t]:
                resumable[t] = True
        return resumable, self._kids_token in prompt

    def allowed(self, prompt: list[int], prefix: list[int]) -> np.ndarray:
        """[V] bool mask of tokens allowed after `prefix` (page tokens so far) for this prompt."""
        resumable, kids = self.prompt_facts(prompt)
        s = self.shape
        used = np.zeros(len(self.tok), dtype=bool)
        used[list(prefix)] = True
        rows = [t for t in prefix if self.is_row[t]]
        row_len = 0
        for t in reversed(prefix):
            if self.is_row[t]:
                break
            row_len += 1
        base = self.is_entity & ~used & (self.kids_safe | (not kids))  # [V]

        def eligible(row_token: int) -> np.ndarray:
            name = self.row_of[row_token]
            elig = self.row_elig[name] & base
            return elig & resumable if name == CONTINUE_WATCHING else elig

        mask = np.zeros(len(self.tok), dtype=bool)
        in_row = bool(rows)
        if in_row and row_len < s.max_row_len:
            mask |= eligible(rows[-1])
        row_done = not in_row or row_len >= s.min_row_len
        if row_done and len(rows) < s.max_rows:
            for r in np.flatnonzero(self.is_row & ~used):
                if eligible(r).sum() >= s.min_row_len:
                    mask[r] = True
        if in_row and row_done and len(rows) >= s.min_rows:
            mask[self.tok.eop_id] = True
        if in_row and row_done and not mask.any():
            mask[self.tok.eop_id] = True  # nothing left to open: end the page rather than dead-end
        return mask

    def violations(self, prompt: list[int], page: list[int]) -> int:
        """Tokens of a finished page that the mask would not have allowed (an audit)."""
        return sum(not self.allowed(prompt, page[:i])[t] for i, t in enumerate(page))
