"""Typed config of the pretraining recipe (`python recipes/pretrain.py`, recipes/configs/pretrain.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import StageConfig, option
from policies.build import ModelSize
from policies.rules import RuleConfig


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """`python recipes/pretrain.py` (recipes/configs/pretrain.yaml)."""

    out_dir: str = option("runs/pretrain", "checkpoints/, model/ (final HF directory), summary.json, wandb/")
    model: ModelSize = option(factory=ModelSize, help="transformer shape and fallback rate")
    rules: RuleConfig = option(factory=RuleConfig, help="business rules saved with the model (policies/rules.py)")
    steps: int = option(500, "optimizer steps")
    batch_size: int = option(32, "sequences (prompt + page) per step")
    lr: float = option(3e-3, "peak AdamW learning rate (cosine decay to 10%)")
    warmup_steps: int = option(30, "linear warmup")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "max gradient norm")
    eval_interval: int = option(250, "steps between held-out loss evaluations (each one scores eval_sequences pages)")
    eval_sequences: int = option(1000, "validation sequences used for the held-out loss")
    checkpoint_interval: int = option(100, "steps between resumable checkpoints")
    seed: int = option(0, "model init, batch order, evaluation users")
    cold_start_titles: int = option(5, "titles held out of training for the cold-start demonstration")
    eval_users: int = option(500, "held-out (test-split) logged contexts the policy generates pages for")
    eval_backend: Literal["vllm", "hf"] = option("vllm", "what generates the evaluation pages: vllm (the serving engine; also checks HF/vLLM log-prob parity) or hf (transformers generate)")
    max_new_tokens: int = option(64, "longest generated page")

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be > 0")
        if self.eval_interval < 1 or self.checkpoint_interval < 1:
            problems.append("eval_interval and checkpoint_interval must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
