"""Typed config of the world recipe (`python recipes/make_world.py`, recipes/configs/world.yaml): the size and
behaviour of the simulated world that produces the toy dataset directory."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import option
from homepage.behavior import BehaviorParams
from homepage.logging_policy import LoggingPolicyConfig
from homepage.rewards import RewardConfig


@dataclass(frozen=True)
class WorldConfig:
    """Size and behaviour of the simulated world. Defaults are the toy world that runs on 2 CPU cores."""

    seed: int = option(0, "everything (catalog, users, logs) is a deterministic function of this")
    n_entities: int = option(400, "catalog size (movies, shows, games)")
    n_users: int = option(4000, "user profiles")
    kids_fraction: float = option(0.15, "share of kids profiles")
    content_dim: int = option(16, "size of the content embedding (stand-in for synopsis/cast embeddings)")
    latent_dim: int = option(8, "size of the hidden taste space")
    new_title_days: int = option(30, "titles released within this many days are 'new'")
    history_min: int = option(6, "shortest viewing history per user (actions)")
    history_max: int = option(20, "longest viewing history per user (actions); all of it fits the prompt")
    split_fractions: tuple[float, float, float] = option((0.8, 0.1, 0.1), "train / valid / test users")
    n_impressions: int = option(24000, "impressions the logging policy serves to build the logs")
    batch_size: int = option(2000, "impressions simulated per vectorized batch (memory vs speed)")
    behavior: BehaviorParams = option(factory=BehaviorParams, help="world-wide constants of the behaviour model (how users browse, play and judge)")
    rewards: RewardConfig = option(factory=RewardConfig, help="reward of each feedback type, written into the dataset's reward table")
    logging_policy: LoggingPolicyConfig = option(factory=LoggingPolicyConfig, help="the production heuristic that serves the logged pages")

    def __post_init__(self) -> None:
        checks = {
            "n_entities": self.n_entities >= 50,
            "n_users": self.n_users >= 10,
            "n_impressions": self.n_impressions >= 1,
            "batch_size": self.batch_size >= 1,
            "history_min": 1 <= self.history_min <= self.history_max,
            "kids_fraction": 0.0 <= self.kids_fraction <= 1.0,
            "split_fractions": len(self.split_fractions) == 3 and abs(sum(self.split_fractions) - 1) < 1e-6,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid world config value(s) {bad}: need n_entities >= 50, n_users >= 10, n_impressions >= 1, "
                "1 <= history_min <= history_max, 0 <= kids_fraction <= 1, split_fractions summing to 1"
            )


@dataclass(frozen=True)
class MakeWorldConfig:
    """Config of `recipes/make_world.py` (recipes/configs/world.yaml)."""

    out_dir: str = option("runs/world", "the dataset directory to write (dataset.yaml, catalog.parquet, logs/, simulator/) and summary.json")
    world: WorldConfig = option(factory=WorldConfig, help="size, behaviour, rewards, logging policy")
    workers: int = option(1, "processes writing log parts at once (each part has its own generator: the logs are "
                          "the same for any number)")
