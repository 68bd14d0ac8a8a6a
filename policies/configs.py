"""Typed configs of the model recipes (YAML under recipes/configs/, `key=value` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.build import ModelSize
from policies.rules import RuleConfig


@dataclass(frozen=True)
class PretrainConfig:
    """`python recipes/pretrain.py` (recipes/configs/pretrain.yaml)."""

    data_dir: str = "runs/world"  # dataset directory (docs/dataset.md); recipes/make_world.py writes the toy one
    environment: str = "auto"  # ground truth for true_* figures: auto (the dataset's own, if any), "" (none), or a dotted path
    out_dir: str = "runs/pretrain"  # checkpoints/, model/ (final HF directory), summary.json, wandb/
    model: ModelSize = field(default_factory=ModelSize)  # transformer shape and fallback rate
    rules: RuleConfig = field(default_factory=RuleConfig)  # business rules saved with the model (policies/rules.py)
    steps: int = 500  # optimizer steps
    batch_size: int = 32  # sequences (prompt + page) per step
    lr: float = 3e-3  # peak AdamW learning rate (cosine decay to 10%)
    warmup_steps: int = 30  # linear warmup
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    eval_interval: int = 250  # steps between held-out loss evaluations (1,000 pages: ~2.3 s each at 2 threads)
    eval_sequences: int = 1000  # validation sequences used for the held-out loss
    checkpoint_interval: int = 100  # steps between resumable checkpoints
    seed: int = 0  # model init, batch order, evaluation users
    cold_start_titles: int = 5  # titles held out of training for the cold-start demonstration
    eval_users: int = 500  # held-out (test-split) logged contexts the policy generates pages for
    eval_backend: str = "vllm"  # "vllm" (the serving engine) or "hf" (transformers generate) for evaluation pages
    max_new_tokens: int = 64  # longest generated page
    num_threads: int = 2  # torch intra-op threads
    wandb_project: str = "genpage"  # wandb project name
    wandb_mode: str = "offline"  # offline (default, no account), online, or disabled

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be > 0")
        if self.eval_interval < 1 or self.checkpoint_interval < 1:
            problems.append("eval_interval and checkpoint_interval must be >= 1")
        if self.eval_backend not in ("vllm", "hf"):
            problems.append(f"eval_backend must be 'vllm' or 'hf', got {self.eval_backend!r}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            problems.append(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if problems:
            raise ValueError("; ".join(problems))
