"""The reward system (paper section 3): per-entity feedback -> a scalar entity reward; page reward = their sum.

Feedback is one of `FEEDBACK_TYPES` per impressed entity, plus an optional thumbs-up. The ordering the
paper's reward system encodes is binge > long play > short play > no interaction (0) > abandoned play.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import option

# Index order is part of the log schema (feedback codes); do not reorder, only append.
FEEDBACK_TYPES: tuple[str, ...] = ("none", "abandon", "short_play", "long_play", "binge")
FEEDBACK_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEEDBACK_TYPES)}
NONE, ABANDON, SHORT_PLAY, LONG_PLAY, BINGE = range(len(FEEDBACK_TYPES))


@dataclass(frozen=True)
class RewardConfig:
    """Reward per feedback type, in reward units. Must satisfy binge > long > short > none = 0 > abandon."""

    binge: float = option(4.0, "watched several episodes in one sitting: the strongest satisfaction signal")
    long_play: float = option(2.0, "watched most of the title")
    short_play: float = option(0.5, "sampled it, then stopped")
    abandon: float = option(-1.0, "started and quit within a couple of minutes: a bad recommendation")
    thumbs_up: float = option(0.5, "added on top of the play reward when the user gave a thumbs-up")

    def __post_init__(self) -> None:
        if not (self.binge > self.long_play > self.short_play > 0.0 > self.abandon):
            raise ValueError(
                "RewardConfig must order binge > long_play > short_play > 0 > abandon; got "
                f"binge={self.binge}, long_play={self.long_play}, short_play={self.short_play}, "
                f"abandon={self.abandon}. Fix the values in the world config's `rewards` section."
            )
        if self.thumbs_up < 0:
            raise ValueError(f"RewardConfig.thumbs_up must be >= 0, got {self.thumbs_up}")

    def feedback_values(self) -> np.ndarray:
        """Reward of each feedback code, indexed like `FEEDBACK_TYPES`.  # [F]"""
        return np.array([0.0, self.abandon, self.short_play, self.long_play, self.binge], dtype=np.float64)


def entity_rewards(feedback: np.ndarray, thumbs_up: np.ndarray, config: RewardConfig) -> np.ndarray:
    """Scalar reward per impressed entity.

    feedback: integer codes into FEEDBACK_TYPES, any shape S (padding may be any valid code).
    thumbs_up: bool, shape S.
    Returns float32 rewards of shape S.
    """
    values = config.feedback_values()  # [F]
    return (values[feedback] + config.thumbs_up * thumbs_up.astype(np.float64)).astype(np.float32)


def page_reward(entity_reward: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Page reward = sum of entity rewards over the page's slots.  [B, ...] -> [B]"""
    r = entity_reward if valid is None else np.where(valid, entity_reward, 0.0)
    return r.reshape(r.shape[0], -1).sum(axis=1).astype(np.float32)
