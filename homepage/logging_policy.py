"""The production ("logging") policy: a noisy multi-stage heuristic that built the pages in the logs.

Stages, as in a classic recommender stack:
1. Candidates: a score per title from what the system can observe (the genres of the user's positively
   engaged history, popularity, freshness), minus titles the user finished; maturity filtered for kids.
2. Row selection: genre rows ranked by the estimated genre interest; Continue Watching first when the user
   has something to resume (mostly), Trending and New Releases mixed in, Kids for kids profiles.
3. Ranking within rows: the best eligible, not yet used candidates fill each row left to right.
Exploration: Gumbel noise on every score, plus a share of "explore" requests with much hotter noise, so the
logs cover alternatives to the greedy page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import option
from homepage.catalog import CONTINUE_WATCHING, GENRES, KIDS, KIDS_GENRES, NEW_RELEASES, ROW_IDS, TRENDING, Catalog
from homepage.pages import PageBatch
from homepage.users import ACTIONS, Requests, Users


@dataclass(frozen=True)
class LoggingPolicyConfig:
    """Knobs of the production heuristic."""

    min_rows: int = option(4, "rows per page, drawn uniformly in [min_rows, max_rows]")
    max_rows: int = option(6, "most rows per page")
    min_row_len: int = option(5, "entities per row, drawn uniformly in [min_row_len, max_row_len]")
    max_row_len: int = option(7, "most entities per row")
    temperature: float = option(0.6, "scale of Gumbel noise on candidate and row scores")
    explore_fraction: float = option(0.15, "share of requests served with hot (exploratory) noise")
    explore_temperature: float = option(3.0, "noise scale on exploratory requests")
    cw_top_probability: float = option(0.85, "how often Continue Watching is pinned first when present")
    row_len_floor: int = option(3, "a row with fewer eligible titles than this is skipped (short rows are allowed)")
    candidates: int = option(1000, "candidate generation: rows are filled from each request's this many best-scored "
                             "titles (and every title it can resume), as production systems do; a catalog of at "
                             "most this many titles (the toy world's 400) is all candidates")

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= self.max_rows:
            raise ValueError(f"logging_policy: need 1 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        if not 1 <= self.row_len_floor <= self.min_row_len <= self.max_row_len:
            raise ValueError(
                f"logging_policy: need 1 <= row_len_floor <= min_row_len <= max_row_len, got "
                f"{self.row_len_floor}, {self.min_row_len}, {self.max_row_len}"
            )


class LoggingPolicy:
    name = "heuristic_v1"

    def __init__(self, catalog: Catalog, users: Users, config: LoggingPolicyConfig):
        self.catalog, self.users, self.config = catalog, users, config
        self._row_elig = catalog.row_static_eligibility()  # [Rn, N]
        kids_rows = [i for i, r in enumerate(ROW_IDS) if r.removeprefix("genre_") in KIDS_GENRES or r == KIDS]
        self._kids_rows = np.zeros(len(ROW_IDS), dtype=bool)
        self._kids_rows[kids_rows] = True

    def observed_genre_interest(self, user: np.ndarray) -> np.ndarray:
        """What production can estimate: genre shares of positively engaged history.  [B] -> [B, G]"""
        us, c = self.users, self.catalog
        ent = us.hist_entity[user]  # [B, H]
        positive = (ent >= 0) & (us.hist_action[user] != ACTIONS.index("abandon"))
        counts = (c.genres[np.clip(ent, 0, None)] * positive[:, :, None]).sum(1).astype(np.float64)  # [B, G]
        return np.log1p(counts) - np.log1p(counts).mean(1, keepdims=True)

    def act(self, user: np.ndarray, req: Requests, rng: np.random.Generator) -> PageBatch:
        """Builds one page per request.  user: [B] -> PageBatch with R = max_rows, L = max_row_len."""
        cfg, c, us = self.config, self.catalog, self.users
        B, N, Rn = len(user), c.n, len(ROW_IDS)
        temp = np.where(rng.random(B) < cfg.explore_fraction, cfg.explore_temperature, cfg.temperature)[:, None]
        kids = us.profile_type[user] == 1  # [B]

        # 1. Candidates.
        interest = self.observed_genre_interest(user)  # [B, G]
        affinity = np.ascontiguousarray((c.genres @ interest.T).T)  # [B, N] row-major: every [B, N] op after is fast
        score = affinity / c.genres.sum(1) + 0.35 * np.log(c.popularity) + 0.3 * c.is_new  # [B, N]
        score = score - 3.0 * us.completed[user]
        score = score + temp * rng.gumbel(size=(B, N))
        allowed = ~(kids[:, None] & ~c.kids_safe[None, :])  # [B, N]
        resume = us.resume[user] & allowed  # [B, N]
        # The pool rows are filled from: the C best-scored titles and every resumable one, in title order; with
        # C >= N every title. Filling rows costs O(B x C) per row, not O(B x N).
        C = min(cfg.candidates, N)
        if C < N:
            cand = np.sort(np.argpartition(-np.where(resume, np.inf, score), C - 1, axis=1)[:, :C], axis=1)  # [B, C]
            score, allowed, resume = (np.take_along_axis(x, cand, 1) for x in (score, allowed, resume))
        else:
            cand = np.broadcast_to(np.arange(N), (B, N))

        # 2. Row selection.
        row_score = np.full((B, Rn), -np.inf)
        row_score[:, : len(GENRES)] = interest
        row_score[:, ROW_IDS.index(TRENDING)] = 0.3
        row_score[:, ROW_IDS.index(NEW_RELEASES)] = 0.0
        row_score = row_score + temp * rng.gumbel(size=(B, Rn))
        row_score[:, ROW_IDS.index(KIDS)] = np.where(kids, 5.0, -np.inf)
        row_score = np.where(kids[:, None] & ~self._kids_rows[None, :] & (np.arange(Rn) != ROW_IDS.index(TRENDING)),
                             -np.inf, row_score)
        has_resume = resume.any(1)
        pin_cw = rng.random(B) < cfg.cw_top_probability
        row_score[:, ROW_IDS.index(CONTINUE_WATCHING)] = np.where(
            has_resume, np.where(pin_cw, 100.0, 1.0 + rng.normal(0, 1, B)), -np.inf
        )
        row_order = np.argsort(-row_score, axis=1)  # [B, Rn]
        n_rows = rng.integers(cfg.min_rows, cfg.max_rows + 1, size=B)

        # 3. Fill rows left to right with the best eligible unused candidates.
        R, L = cfg.max_rows, cfg.max_row_len
        out_rows = np.full((B, R), -1, dtype=np.int64)
        out_ents = np.full((B, R, L), -1, dtype=np.int64)
        used = np.zeros(cand.shape, dtype=bool)  # [B, C]
        filled = np.zeros(B, dtype=np.int64)
        bidx = np.arange(B)
        for k in range(Rn):
            active = filled < n_rows
            if not active.any():
                break
            row = row_order[:, k]  # [B]
            ok_row = active & np.isfinite(row_score[bidx, row])
            elig = self._row_elig[row[:, None], cand] & allowed & ~used  # [B, C]
            elig = np.where((row == ROW_IDS.index(CONTINUE_WATCHING))[:, None], elig & resume, elig)
            length = rng.integers(cfg.min_row_len, cfg.max_row_len + 1, size=B)
            n_elig = elig.sum(1)
            ok_row &= n_elig >= cfg.row_len_floor
            length = np.minimum(length, n_elig)
            masked = np.where(elig, score, -np.inf)
            top = np.argsort(-masked, axis=1)[:, :L]  # [B, L] into the candidates
            keep = ok_row[:, None] & (np.arange(L)[None, :] < length[:, None])  # [B, L]
            slot = np.minimum(filled, R - 1)
            out_rows[bidx[ok_row], slot[ok_row]] = row[ok_row]
            out_ents[bidx, slot] = np.where(keep, np.take_along_axis(cand, top, 1),
                                            np.where(ok_row[:, None], -1, out_ents[bidx, slot]))
            used[np.repeat(bidx, L)[keep.ravel()], top.ravel()[keep.ravel()]] = True
            filled += ok_row
        return PageBatch(out_rows, out_ents)
