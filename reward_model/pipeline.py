"""The reward-model recipe's training stage: each initialization (pretrained, and the random-backbone ablation)
trained, saved with its tokenizer and evaluated, one after the other or at once in child processes.

Two processes of one thread each can train faster together than one process of two threads trains them in
turn: the model's matrix products are too small to keep two threads busy (timings in
docs/experiments/reward_model.md). Both runs see the same data in the same order, as they would in turn; only
the floating-point summation order of the thread count differs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import distributed
from policies.data import PageSequences
from policies.tokenizer import GenPageTokenizer
from reward_model.config import RewardModelConfig
from reward_model.data import EntityTargets, RewardNormalization
from reward_model.evaluation import EvalSet, evaluate
from reward_model.scoring import PageRewardScorer
from reward_model.training import fit


@dataclass(frozen=True)
class InitRun:
    """One initialization's training run: where its model and checkpoints go, its wandb name."""

    init: str  # "pretrained" or "scratch" (reward_model.training.INITIALIZERS)
    model_dir: Path  # final HF directory (with the tokenizer)
    ckpt_dir: Path  # resumable checkpoints
    wandb_dir: Path  # the wandb run's files go under wandb_dir/wandb
    name: str  # wandb run and progress-bar name


@dataclass
class InitResult:
    """What the recipe reports of one run: ground-truth and observed metrics, and the validation predictions
    (reward units) for the scatter plot."""

    metrics: dict
    valid_pred: np.ndarray


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """In a child process: exit as soon as the parent `parent_pid` is gone. A parent killed outright (SIGKILL,
    or SIGTERM without a handler) cannot stop its children; without this they would keep training and writing
    checkpoints under a rerun that resumes from the same directory."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def train_and_evaluate(run: InitRun, cfg: RewardModelConfig, train: PageSequences, valid: PageSequences,
                       norm: RewardNormalization, tok: GenPageTokenizer, evalset: EvalSet,
                       targets: EntityTargets | None, num_threads: int, bar_position: int = 0,
                       parent_pid: int | None = None,
                       ranks: distributed.Ranks = distributed.Ranks()) -> InitResult | None:
    """Trains (or resumes) one initialization, saves it, scores the evaluation sets with the saved model (what
    users load), and closes its wandb run with the evaluation in its summary. parent_pid: in a child process,
    the recipe's process (the child exits when it is gone). ranks: under torchrun, every rank trains its part
    of each batch; rank 0 alone saves and evaluates (the others return None)."""
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    torch.set_num_threads(num_threads)
    result = fit(run.init, cfg, train, valid, norm, tok.pad_id, tok.eop_id, run.ckpt_dir, run.wandb_dir, run.name,
                 targets, bar_position, ranks)
    if not ranks.is_main:
        result.wandb_run.finish()
        return None
    result.model.save_pretrained(run.model_dir)
    tok.save_pretrained(run.model_dir)
    scorer = PageRewardScorer.from_pretrained(run.model_dir, batch_size=cfg.score_batch_size)
    valid_pred = scorer.score(evalset.prompts, evalset.pages)  # [N] the validation impressions, reward units
    metrics = evaluate(scorer.score, evalset, valid_pred)
    metrics.update({"valid_loss_history": result.history, "train_s": result.train_s,
                    "tokens_per_s": result.train_tokens / result.train_s if result.train_s else None,
                    "resumed_from_step": result.resumed_from})
    result.wandb_run.summary.update({f"rm/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    result.wandb_run.finish()
    print(f"[{run.name}] " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return InitResult(metrics, valid_pred)


def train_inits(runs: list[InitRun], cfg: RewardModelConfig, train: PageSequences, valid: PageSequences,
                norm: RewardNormalization, tok: GenPageTokenizer, evalset: EvalSet,
                targets: EntityTargets | None,
                ranks: distributed.Ranks = distributed.Ranks()) -> dict[str, InitResult | None]:
    """Every run of `runs`, at once in child processes (cfg.parallel_inits, more than one run and at least as
    many threads as runs, one process) or in turn in this process (always under torchrun: each run is data
    parallel over the ranks; rank 0's results are the results, the others' None). -> {init: result}"""
    args = (cfg, train, valid, norm, tok, evalset, targets)
    if ranks.distributed or not cfg.parallel_inits or len(runs) < 2 or cfg.num_threads < len(runs):
        return {run.init: train_and_evaluate(run, *args, num_threads=cfg.num_threads, ranks=ranks) for run in runs}
    threads = cfg.num_threads // len(runs)
    print(f"[train_rm] training {', '.join(r.init for r in runs)} at once: {len(runs)} processes x {threads} thread(s)")
    # spawn: a fresh interpreter per run (no forked torch thread pools); the children import this module.
    with ProcessPoolExecutor(len(runs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {run.init: pool.submit(train_and_evaluate, run, *args, num_threads=threads, bar_position=i,
                                         parent_pid=os.getpid()) for i, run in enumerate(runs)}
        return {init: f.result() for init, f in futures.items()}
