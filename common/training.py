"""Training utilities every training stage shares: checkpoints with resume, the
learning-rate schedule, wandb setup (offline by default)."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.pt"


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer state was written last), or None."""
    done = [p for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).exists()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, extra: dict, keep: int = 2) -> Path:
    """Model via save_pretrained, then optimizer/RNG state, into a hidden temporary directory renamed to step_<n>
    once complete: a kill during the write leaves only the temporary directory, which no resume picks (and the
    next save replaces)."""
    path = ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = ckpt_dir / f".tmp_{CHECKPOINT_PREFIX}{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "extra": extra, **rng_state()}
    torch.save(state, tmp / TRAINER_STATE)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    old = sorted(ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for p in old[:-keep]:
        shutil.rmtree(p)
    return path


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors, lists and numbers only: loadable with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch_rng": torch.get_rng_state(),
            "numpy_rng": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python_rng": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def load_trainer_state(path: Path, optimizer) -> tuple[int, dict]:
    """Restores optimizer and RNG states of a checkpoint. weights_only=True: a checkpoint is data, never code."""
    state = torch.load(path / TRAINER_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    n = state["numpy_rng"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python_rng"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    return state["step"], state["extra"]


def init_wandb(project: str, run_dir: Path, config: dict, mode: str, name: str, resume_id: str | None = None):
    """wandb run, offline by default (no account needed); files under run_dir/wandb."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=project, dir=str(run_dir), config=config, mode=mode, name=name,
        id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
    )
