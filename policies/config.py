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


@dataclass(frozen=True)
class WbcConfig(StageConfig):
    """`python recipes/wbc.py` (recipes/configs/wbc.yaml): weighted binary classification from a pretrained
    GenPage (paper section 5.2; policies/wbc.py)."""

    pretrained_dir: str = option("runs/pretrain/model", "the pretrained GenPage checkpoint WBC starts from (with its tokenizer and rules)")
    out_dir: str = option("runs/wbc", "checkpoints/, model/ (HF directory servable by the vLLM plugin), summary.json, wandb/")
    zero_reward: Literal["negative", "ignore"] = option("negative", "a title shown and not played (reward 0): 'negative' (label 0, weight zero_weight) or 'ignore' (no loss)")
    zero_weight: float = option(0.5, "weight of a zero-reward token in 'negative' mode, against |reward| for the others (docs/wbc.md)")
    steps: int = option(600, "optimizer steps")
    batch_size: int = option(32, "logged pages per step")
    lr: float = option(1e-3, "peak AdamW learning rate (cosine decay to 10%)")
    warmup_steps: int = option(30, "linear warmup")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "max gradient norm")
    eval_interval: int = option(200, "steps between held-out weighted-BCE evaluations")
    eval_sequences: int = option(1000, "validation pages for the held-out metrics")
    checkpoint_interval: int = option(100, "steps between resumable checkpoints")
    seeds: tuple[int, ...] = option((0, 1, 2), "one WBC run per seed (its batch order); the summary reports the mean and spread over seeds")
    scratch_ablation: bool = option(True, "also train WBC from a random initialization with the first seed (the paper's without-pretraining row)")
    eval_users: int = option(500, "held-out (test-split) logged contexts each seed's WBC policy writes pages for (the same contexts for every seed: the pretraining recipe's)")
    eval_backend: Literal["vllm", "hf"] = option("vllm", "what generates the evaluation pages: vllm or hf (transformers generate)")
    max_new_tokens: int = option(64, "longest generated page")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must list at least one seed, each once (got {list(self.seeds)}), e.g. seeds=[0]")
        if self.zero_weight < 0:
            raise ValueError("zero_weight must be >= 0")
