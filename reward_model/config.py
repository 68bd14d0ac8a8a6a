"""Typed config of the reward-model recipe (`python recipes/train_rm.py`, recipes/configs/train_rm.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import StageConfig, option

# The heads reward_model.heads registers (tests/reward_model/test_heads.py checks the two lists agree).
RewardHeadName = Literal["entity_feedback", "entity_sum", "last"]


@dataclass(frozen=True)
class RewardModelConfig(StageConfig):
    """`python recipes/train_rm.py` (recipes/configs/train_rm.yaml)."""

    pretrained_dir: str = option("runs/pretrain/model", "GenPage checkpoint (with its tokenizer) from recipes/pretrain.py")
    out_dir: str = option("runs/rm", "model/, scratch_model/ (with scratch_ablation), checkpoints/, summary.json, results.md, plot, wandb/")
    steps: int = option(1200, "optimizer steps of each training run")
    batch_size: int = option(32, "impressions (context + page) per step")
    lr: float = option(1e-3, "peak AdamW learning rate of the reward head (cosine decay to 10%)")
    backbone_lr: float = option(5e-4, "peak learning rate of the transformer backbone (both initializations)")
    reward_head: RewardHeadName = option("entity_feedback", "how the page score is read: entity_feedback (sum over page tokens of each title's expected reward under its predicted feedback), entity_sum (sum of regressed per-token rewards) or last (one scalar at [EOP])")
    entity_loss_weight: float = option(100.0, "weight of each title's loss: NLL of its logged feedback (entity_feedback) or MSE vs its logged entity reward (entity_sum)")
    shrink_perturb: float = option(0.6, "pretrained init: each transformer-layer weight matrix w -> s w + (1 - s) fresh-init noise (shrink and perturb, Ash & Adams 2020); 1 = as pretrained; the default was chosen on ground-truth pairwise accuracy (docs/experiments/reward_model.md)")
    ema_decay: float = option(0.995, "exponential moving average of the weights (evaluated and saved); 0 = the live weights")
    warmup_steps: int = option(30, "linear warmup")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "max gradient norm")
    eval_interval: int = option(400, "steps between validation-loss evaluations (each one scores eval_sequences impressions)")
    eval_sequences: int = option(1000, "validation impressions used for the validation loss during training")
    eval_impressions: int = option(0, "validation impressions the held-out figures are computed on: a random sample of this many (0: all; a large log's validation split takes long to score)")
    checkpoint_interval: int = option(100, "steps between resumable checkpoints")
    scratch_ablation: bool = option(False, "also train from a randomly initialized backbone (paper Table 1 ablation; it doubles the training, so the demo leaves it to `make compare`)")
    parallel_inits: bool = option(True, "train the two initializations at once, one process each with num_threads // 2 threads (the model's matrix products are too small to keep two threads busy; timings: docs/experiments/reward_model.md)")
    ridge_lambda: float = option(100.0, "L2 penalty of the bag-of-entities linear baseline")
    ridge_impressions: int = option(0, "train impressions the linear baseline is fitted on: a random sample of this many (0: all; beyond ~1 M its sparse solve takes minutes and GBs)")
    generated_users: int = option(300, "held-out (valid-split) logged contexts that get 2 pages from the pretrained policy; 0 skips")
    eval_backend: Literal["vllm", "hf"] = option("vllm", "what generates the pages of the generated-page evaluation: vllm (the serving engine) or hf (transformers generate)")
    max_new_tokens: int = option(64, "longest generated page")
    score_batch_size: int = option(128, "sequences per forward pass when scoring")
    seed: int = option(0, "head and scratch initialization, batch order, evaluation users")

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1 or self.score_batch_size < 1:
            problems.append("steps, batch_size and score_batch_size must be >= 1")
        if self.lr <= 0 or self.backbone_lr < 0:
            problems.append("lr must be > 0 and backbone_lr >= 0 (0 freezes the backbone)")
        if self.eval_interval < 1 or self.checkpoint_interval < 1 or self.eval_sequences < 1:
            problems.append("eval_interval, checkpoint_interval and eval_sequences must be >= 1")
        if not 0.0 < self.shrink_perturb <= 1.0:
            problems.append(f"shrink_perturb must be in (0, 1] (1 keeps the pretrained weights), got {self.shrink_perturb}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ridge_lambda < 0 or self.generated_users < 0 or self.entity_loss_weight < 0:
            problems.append("ridge_lambda, generated_users and entity_loss_weight must be >= 0")
        if not self.data_dir:
            problems.append("set data_dir=DIR (a dataset directory, docs/dataset.md)")
        if problems:
            raise ValueError("; ".join(problems))
