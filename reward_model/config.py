"""Typed config of the reward-model recipe (recipes/configs/train_rm.yaml, `key=value` overrides)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardModelConfig:
    """`python recipes/train_rm.py` (recipes/configs/train_rm.yaml)."""

    pretrained_dir: str = "runs/pretrain/model"  # GenPage checkpoint (with its tokenizer) from recipes/pretrain.py
    data_dir: str = "runs/world"  # dataset directory (docs/dataset.md): catalog, schema and the logs trained on
    environment: str = "auto"  # ground truth for gt_* figures: auto (the dataset's own, if any), "" (none), or a dotted path
    out_dir: str = "runs/rm"  # model/, scratch/model/, checkpoints/, summary.json, results.md, plot, wandb/
    steps: int = 1200  # optimizer steps of each training run
    batch_size: int = 32  # impressions (context + page) per step
    lr: float = 1e-3  # peak AdamW learning rate of the scalar head (cosine decay to 10%)
    backbone_lr: float = 5e-4  # peak learning rate of the transformer backbone (both initializations)
    reward_head: str = "entity_feedback"  # page score = sum of per-token rewards, each the expected reward of a predicted feedback ("entity_feedback") or a regressed reward ("entity_sum"); "last": one scalar at [EOP]
    entity_loss_weight: float = 100.0  # weight of each title's loss: NLL of its logged feedback (entity_feedback) or MSE vs its logged entity reward (entity_sum)
    shrink_perturb: float = 0.6  # pretrained init: each transformer-layer weight matrix w -> s w + (1 - s) fresh-init noise (shrink and perturb, Ash & Adams 2020); 1 = as pretrained
    ema_decay: float = 0.995  # exponential moving average of the weights (evaluated and saved); 0 = the live weights
    warmup_steps: int = 30  # linear warmup
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    eval_interval: int = 400  # steps between validation-loss evaluations (~5 s each at one thread for 1,000 impressions)
    eval_sequences: int = 1000  # validation impressions used for the validation loss during training
    checkpoint_interval: int = 100  # steps between resumable checkpoints
    scratch_ablation: bool = True  # also train from a randomly initialized backbone (paper Table 1 ablation)
    parallel_inits: bool = True  # train the two initializations at once, one process each with num_threads // 2 threads (2 cores: 1,200 steps in ~415 s for both vs ~500 s one after the other with 2 threads)
    ridge_lambda: float = 100.0  # L2 penalty of the bag-of-entities linear baseline
    generated_users: int = 300  # held-out (valid-split) logged contexts that get 2 pages from the pretrained policy; 0 skips
    eval_backend: str = "vllm"  # "vllm" (the serving engine) or "hf" (transformers generate) for generated pages
    max_new_tokens: int = 64  # longest generated page
    score_batch_size: int = 128  # sequences per forward pass when scoring
    seed: int = 0  # head and scratch initialization, batch order, evaluation users
    num_threads: int = 2  # torch intra-op threads
    wandb_project: str = "genpage"  # wandb project name
    wandb_mode: str = "offline"  # offline (default, no account), online, or disabled

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
        if self.reward_head not in ("entity_feedback", "entity_sum", "last"):
            problems.append(f"reward_head must be 'entity_feedback', 'entity_sum' or 'last', got {self.reward_head!r}")
        if self.eval_backend not in ("vllm", "hf"):
            problems.append(f"eval_backend must be 'vllm' or 'hf', got {self.eval_backend!r}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            problems.append(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if not self.data_dir:
            problems.append("set data_dir=DIR (a dataset directory, docs/dataset.md)")
        if problems:
            raise ValueError("; ".join(problems))
