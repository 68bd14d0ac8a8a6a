"""Early stopping of a Dr. GRPO run on a reward model kept out of training.

A policy optimized against one reward model eventually climbs that model's errors: its RM score keeps rising
while the true reward stalls or falls (Gao et al., 2022, "Scaling Laws for Reward Model Overoptimization"). A real
deployment has no truth to watch, but it can train a second reward model (another seed, other logs) and keep it
out of training: the validator. Its score on each step's rollouts stands in for the truth; the run stops when the
validator's moving average over `window` steps has not reached a new best for `patience` steps.

The decision is a pure function of the per-step history (`should_stop`); `EarlyStopState` keeps that history in
the seed's run directory (`early_stop.json`), so a run resumed from a checkpoint replays the steps after it and
decides the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STATE_FILE = "early_stop.json"


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """[n] -> [n - window + 1] means of `window` consecutive values (empty when n < window)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[window:] - c[:-window]) / window


def should_stop(history: dict[int, float], patience: int, window: int) -> bool:
    """history: step -> the validator's mean score of that step's rollouts. True when the moving average over
    `window` steps has had no new best in its last `patience` values (consecutive steps from 1 assumed)."""
    if patience < 1:
        return False
    ma = moving_average(np.array([history[s] for s in sorted(history)]), window)
    if len(ma) <= patience:
        return False
    return int(np.argmax(ma)) <= len(ma) - 1 - patience  # the best is at least `patience` values old


@dataclass
class EarlyStopState:
    """The validator's per-step history of one seed, and the step the run stops at (None: not stopped)."""

    path: Path
    history: dict[int, float] = field(default_factory=dict)
    stopped_at: int | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> "EarlyStopState":
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, {int(k): float(v) for k, v in data["history"].items()}, data.get("stopped_at"))

    def record(self, step: int, value: float, patience: int, window: int) -> bool:
        """Adds step's value (forgetting any later steps: a resumed run replays them) and decides; on a stop the
        run ends at the next step (verl decides a step is its last before running it). A decision is final: a run
        resumed after it ends at the same step. -> stopped now."""
        self.history = {s: v for s, v in self.history.items() if s < step}
        self.history[step] = float(value)
        stop = self.stopped_at is None and should_stop(self.history, patience, window)
        if stop:
            self.stopped_at = step + 1
        self.save()
        return stop

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": self.history, "stopped_at": self.stopped_at}, indent=1))
        tmp.replace(self.path)
