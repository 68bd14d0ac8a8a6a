"""Homepages: a structured form (row ids and entity ids, what logs and people read; every stage uses it) and a
padded array form (indices into the toy world's rows and catalog, what the simulator computes on)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Row:
    """One row of a page: its row id (e.g. "genre_comedy", "continue_watching") and entities left to right."""

    row_id: str
    entity_ids: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    """A whole homepage: rows top to bottom."""

    rows: tuple[Row, ...]

    @property
    def entity_ids(self) -> list[str]:
        """All entities in layout order (left to right, top to bottom)."""
        return [e for row in self.rows for e in row.entity_ids]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class PageBatch:
    """B pages as padded index arrays (the simulator's form). Row index into the toy world's ROW_IDS, entity index
    into its catalog; -1 = padding.

    A row slot with row index -1 has no entities; entities of a row are contiguous from column 0.
    """

    rows: np.ndarray  # [B, R] int64
    entities: np.ndarray  # [B, R, L] int64

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def valid(self) -> np.ndarray:
        return self.entities >= 0  # [B, R, L] bool

    def take(self, idx: np.ndarray) -> "PageBatch":
        return PageBatch(self.rows[idx], self.entities[idx])

    def to_pages(self, entity_ids: list[str]) -> list[Page]:
        from homepage.catalog import ROW_IDS

        pages = []
        for b in range(len(self)):
            rows = []
            for r in range(self.rows.shape[1]):
                if self.rows[b, r] < 0:
                    continue
                ents = self.entities[b, r]
                rows.append(Row(ROW_IDS[self.rows[b, r]], tuple(entity_ids[e] for e in ents[ents >= 0])))
            pages.append(Page(tuple(rows)))
        return pages

    @classmethod
    def from_pages(
        cls, pages: list[Page], entity_index: dict[str, int], max_rows: int | None = None, max_len: int | None = None
    ) -> "PageBatch":
        """Packs structured pages; raises KeyError naming the page for unknown row or entity ids."""
        from homepage.catalog import ROW_IDS

        R = max_rows or max((len(p.rows) for p in pages), default=1)
        L = max_len or max((len(r.entity_ids) for p in pages for r in p.rows), default=1)
        rows = np.full((len(pages), max(R, 1)), -1, dtype=np.int64)
        ents = np.full((len(pages), max(R, 1), max(L, 1)), -1, dtype=np.int64)
        row_index = {r: i for i, r in enumerate(ROW_IDS)}
        for b, page in enumerate(pages):
            if len(page.rows) > R:
                raise ValueError(f"page {b} has {len(page.rows)} rows, more than max_rows={R}")
            for r, row in enumerate(page.rows):
                if row.row_id not in row_index:
                    raise KeyError(f"page {b}, row {r}: unknown row id {row.row_id!r}; known: {', '.join(ROW_IDS)}")
                rows[b, r] = row_index[row.row_id]
                if len(row.entity_ids) > L:
                    raise ValueError(f"page {b}, row {r} has {len(row.entity_ids)} entities, more than max_len={L}")
                for c, e in enumerate(row.entity_ids):
                    if e not in entity_index:
                        raise KeyError(f"page {b}, row {r}, column {c}: entity {e!r} is not in the world's catalog")
                    ents[b, r, c] = entity_index[e]
        return cls(rows, ents)
