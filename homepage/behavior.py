"""The user-behaviour model: how a user browses a whole page and what feedback each impressed entity gets.

Page-level interactions (why a page must be optimized as a whole, paper section 1):
- Browsing: rows are visited top to bottom. A reached row is looked at with a row interest that depends on
  the row (a genre the user likes, Continue Watching when there is something to resume), and within it
  column c is examined with probability col_decay**c (position bias).
- Stopping power: after a row, the user moves on with probability patience * (1 - stop * [played from it]).
  A row with high appeal ends browsing, which lowers the value of every row below it.
- Satiation: an entity's appeal falls with its content similarity to every entity placed before it on the
  page (above, or to the left), so near-duplicates give diminishing returns.
- Feedback for a played entity depends on how well it matches the user: a poor match is abandoned or played
  briefly, a good one is played long, binged (shows) and sometimes given a thumbs-up.

Every probability is a deterministic function of (user, request, page), and continuation depends on the
row's play outcome only through its probability, so the expected page reward is exact (`expected_reward`),
and `sample` draws feedback from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import option
from homepage.catalog import CONTINUE_WATCHING, ENTITY_TYPES, KIDS, NEW_RELEASES, ROW_IDS, TRENDING, Catalog
from homepage.pages import PageBatch
from homepage.rewards import ABANDON, BINGE, LONG_PLAY, NONE, SHORT_PLAY, RewardConfig, entity_rewards
from homepage.users import DEVICES, Requests, Users


@dataclass(frozen=True)
class BehaviorParams:
    """World-wide constants of the behaviour model (per-user parameters live in `Users`)."""

    click_bias: float = option(-2.6, "base logit of playing an examined entity")
    popularity_weight: float = option(0.15, "weight of log popularity in appeal (social proof)")
    language_bonus: float = option(0.3, "appeal bonus for titles in the user's language")
    new_bonus: float = option(0.25, "appeal bonus for new titles")
    resume_bonus: float = option(1.2, "appeal bonus for a title the user is partway through")
    completed_penalty: float = option(2.0, "appeal penalty for a title the user already finished")
    mature_kids_penalty: float = option(5.0, "appeal penalty for a non-kids-safe title on a kids profile")
    satiation_threshold: float = option(0.45, "content cosine similarity above which titles satiate each other")
    row_interest_bias: float = option(0.6, "base logit of looking at a reached genre row")
    row_interest_weight: float = option(0.8, "weight of the user's genre affinity in that logit")
    satisfaction_bias: float = option(0.3, "base logit of a played title satisfying the user")

    def __post_init__(self) -> None:
        if not 0.0 <= self.satiation_threshold < 1.0:
            raise ValueError(f"behavior.satiation_threshold must be in [0, 1), got {self.satiation_threshold}")


@dataclass
class PageProbabilities:
    """Per-slot probabilities for a batch of pages. Shapes: [B, R, L] unless noted."""

    engage: np.ndarray  # P(play | row reached)
    reach: np.ndarray  # [B, R] P(row reached)
    row_any: np.ndarray  # [B, R] P(something played from the row | reached)
    continue_if_none: np.ndarray  # [B, R] P(move on | reached, nothing played)
    continue_if_played: np.ndarray  # [B, R] P(move on | reached, something played)
    outcome: np.ndarray  # [B, R, L, 4] P(abandon, short, long, binge | played)
    thumbs: np.ndarray  # P(thumbs-up | played)
    valid: np.ndarray  # bool

    @property
    def play(self) -> np.ndarray:
        return self.reach[:, :, None] * self.engage  # [B, R, L] unconditional P(play)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class BehaviorModel:
    """Computes browsing and feedback probabilities for (user, request, page) batches."""

    def __init__(self, catalog: Catalog, users: Users, params: BehaviorParams, rewards: RewardConfig):
        self.catalog, self.users, self.params, self.rewards = catalog, users, params, rewards
        self._row_genre = catalog.row_genre()  # [Rn]
        self._game = catalog.entity_type == ENTITY_TYPES.index("game")

    def probabilities(self, user: np.ndarray, req: Requests, pages: PageBatch) -> PageProbabilities:
        """user: [B] user indices; req: B requests; pages: B pages."""
        c, us, p = self.catalog, self.users, self.params
        valid = pages.valid  # [B, R, L]
        B, R, L = valid.shape
        ent = np.where(valid, pages.entities, 0)  # [B, R, L] safe index
        kids_profile = us.profile_type[user] == 1  # [B]
        device = req.device
        evening = (req.hour >= 18) | (req.hour <= 1)
        weekend = req.day_of_week >= 5

        # Appeal logit of each slot, before satiation.
        match = np.einsum("bk,brlk->brl", us.taste[user], c.latent[ent]) + c.quality[ent]  # [B, R, L]
        logit = p.click_bias + match + p.popularity_weight * np.log(c.popularity[ent])
        logit += p.language_bonus * (c.language[ent] == us.language[user][:, None, None])
        logit += p.new_bonus * c.is_new[ent]
        resume = us.resume[user[:, None, None], ent]
        logit += p.resume_bonus * resume
        logit -= p.completed_penalty * us.completed[user[:, None, None], ent]
        mature_for_kid = kids_profile[:, None, None] & ~c.kids_safe[ent]
        logit -= p.mature_kids_penalty * mature_for_kid
        # Context: games are played on a TV (console), less on the web.
        game_ctx = np.select([device == DEVICES.index("tv"), device == DEVICES.index("web")], [0.4, -0.4], 0.0)
        logit += game_ctx[:, None, None] * self._game[ent]
        # Resuming belongs in the Continue Watching row, where users look for it.
        in_cw = pages.rows == ROW_IDS.index(CONTINUE_WATCHING)  # [B, R]
        logit += 0.4 * (resume & in_cw[:, :, None])

        # Satiation over the page in layout order.
        P = R * L
        emb = c.content_emb[ent.reshape(B, P)] * valid.reshape(B, P, 1)  # [B, P, D]
        sim = np.einsum("bpd,bqd->bpq", emb, emb)  # [B, P, P]
        earlier = np.tril(np.ones((P, P), dtype=bool), k=-1)  # q before p
        overlap = np.clip(sim - p.satiation_threshold, 0.0, None) / (1.0 - p.satiation_threshold)
        sat = (overlap * earlier).sum(-1).reshape(B, R, L)  # [B, R, L]
        logit -= us.satiation[user][:, None, None] * sat
        click = _sigmoid(logit)

        # Row interest, then position bias within the row.
        rows = np.where(pages.rows >= 0, pages.rows, 0)  # [B, R]
        g = self._row_genre[rows]  # [B, R]
        aff = us.genre_affinity[user[:, None], np.clip(g, 0, None)]  # [B, R]
        interest_logit = p.row_interest_bias + p.row_interest_weight * aff
        has_resume = us.resume[user].any(1)  # [B]
        special = {
            ROW_IDS.index(CONTINUE_WATCHING): np.where(has_resume, 2.5, -2.0)[:, None],
            ROW_IDS.index(TRENDING): np.full((B, 1), 0.8),
            ROW_IDS.index(NEW_RELEASES): np.full((B, 1), 0.5),
            ROW_IDS.index(KIDS): np.where(kids_profile, 2.0, -1.0)[:, None],
        }
        for row_idx, val in special.items():
            interest_logit = np.where(rows == row_idx, val, interest_logit)
        interest = _sigmoid(interest_logit) * (pages.rows >= 0)  # [B, R]
        col_bias = us.col_decay[user][:, None] ** np.arange(L)[None, :]  # [B, L]
        engage = interest[:, :, None] * col_bias[:, None, :] * click * valid  # [B, R, L]

        # Stopping power: reaching the next row depends on whether something was played from this one.
        row_any = 1.0 - np.prod(1.0 - engage, axis=2)  # [B, R]
        patience = us.patience[user] * np.where(device == DEVICES.index("mobile"), 0.9, 1.0)
        patience = np.clip(patience * np.where(weekend, 1.03, 1.0), 0.0, 0.99)[:, None]  # [B, 1]
        cont_none = np.broadcast_to(patience, (B, R))
        cont_played = np.broadcast_to(patience * (1.0 - us.stop[user][:, None]), (B, R))
        cont = row_any * cont_played + (1.0 - row_any) * cont_none  # [B, R] E[continue | reached]
        reach = np.concatenate([np.ones((B, 1)), np.cumprod(cont, axis=1)[:, :-1]], axis=1)  # [B, R]

        # Outcome of a play from match quality and context.
        satisfy = _sigmoid(p.satisfaction_bias + match + 1.0 * resume - p.mature_kids_penalty * mature_for_kid)
        ab = us.abandon[user][:, None, None]
        binge_ctx = np.where(device == DEVICES.index("tv"), 1.3, np.where(device == DEVICES.index("mobile"), 0.5, 1.0))
        binge_ctx = binge_ctx * np.where(evening | weekend, 1.3, 1.0)
        binge_frac = np.clip(us.binge[user] * binge_ctx, 0.0, 0.95)[:, None, None] * c.is_show[ent]
        outcome = np.stack(
            [(1 - satisfy) * ab, (1 - satisfy) * (1 - ab), satisfy * (1 - binge_frac), satisfy * binge_frac], axis=-1
        )  # [B, R, L, 4]
        thumbs = satisfy * us.thumbs[user][:, None, None]
        return PageProbabilities(engage, reach, row_any, cont_none, cont_played, outcome, thumbs, valid)

    def expected_entity_reward(self, user: np.ndarray, req: Requests, pages: PageBatch) -> np.ndarray:
        """Exact expected reward of each slot.  -> [B, R, L] (0 on padding)."""
        pr = self.probabilities(user, req, pages)
        vals = self.rewards.feedback_values()[[ABANDON, SHORT_PLAY, LONG_PLAY, BINGE]]  # [4]
        per_play = pr.outcome @ vals + pr.thumbs * self.rewards.thumbs_up  # [B, R, L]
        return np.where(pr.valid, pr.play * per_play, 0.0)

    def expected_reward(self, user: np.ndarray, req: Requests, pages: PageBatch) -> np.ndarray:
        """Ground truth: exact expected page reward.  -> [B] float64"""
        return self.expected_entity_reward(user, req, pages).reshape(len(pages), -1).sum(1)

    def sample(self, user: np.ndarray, req: Requests, pages: PageBatch, rng: np.random.Generator) -> "Feedback":
        """Draws one browsing session per page from the same distribution as `expected_reward`."""
        pr = self.probabilities(user, req, pages)
        B, R, L = pr.valid.shape
        played = np.zeros((B, R, L), dtype=bool)
        reached = np.zeros((B, R), dtype=bool)
        here = np.ones(B, dtype=bool)
        for r in range(R):
            reached[:, r] = here
            played[:, r] = here[:, None] & (rng.random((B, L)) < pr.engage[:, r])
            any_play = played[:, r].any(1)
            cont = np.where(any_play, pr.continue_if_played[:, r], pr.continue_if_none[:, r])
            here = here & (rng.random(B) < cont)
        cum = np.cumsum(pr.outcome, axis=-1)  # [B, R, L, 4]
        draw = (rng.random((B, R, L, 1)) > cum).sum(-1).clip(0, 3)  # [B, R, L] 0..3
        codes = np.array([ABANDON, SHORT_PLAY, LONG_PLAY, BINGE])[draw]
        feedback = np.where(played, codes, NONE).astype(np.int8)
        thumbs = played & (rng.random((B, R, L)) < pr.thumbs)
        runtime = self.catalog.runtime_min[np.where(pr.valid, pages.entities, 0)]
        frac = np.select(
            [feedback == ABANDON, feedback == SHORT_PLAY, feedback == LONG_PLAY, feedback == BINGE],
            [rng.uniform(0.01, 0.03, (B, R, L)), rng.uniform(0.05, 0.3, (B, R, L)),
             rng.uniform(0.6, 1.0, (B, R, L)), rng.uniform(2.0, 5.0, (B, R, L))],
            0.0,
        )
        minutes = np.where(feedback == ABANDON, rng.uniform(0.3, 2.5, (B, R, L)), runtime * frac).astype(np.float32)
        rewards = np.where(pr.valid, entity_rewards(feedback, thumbs, self.rewards), 0.0).astype(np.float32)
        rows_viewed = (reached & (pages.rows >= 0)).sum(1).astype(np.int8)
        return Feedback(feedback, minutes, thumbs, rewards, rows_viewed)


@dataclass
class Feedback:
    """Observed feedback for a batch of pages, aligned with the PageBatch slots."""

    feedback: np.ndarray  # [B, R, L] int8 codes into rewards.FEEDBACK_TYPES
    play_minutes: np.ndarray  # [B, R, L] float32
    thumbs_up: np.ndarray  # [B, R, L] bool
    entity_rewards: np.ndarray  # [B, R, L] float32 (reward system applied)
    rows_viewed: np.ndarray  # [B] int8 rows the user reached

    @property
    def page_reward(self) -> np.ndarray:
        return self.entity_rewards.reshape(len(self.rows_viewed), -1).sum(1)  # [B]
