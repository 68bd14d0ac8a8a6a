"""Training the page-level reward model (paper section 5.3): GenPage's backbone with a reward head
(reward_model.heads; by default "entity_feedback": the page score is the sum over the page tokens of each
title's expected reward under its predicted feedback distribution and thumbs-up), regressed on the standardized
page reward (sum of entity rewards) plus the head's per-title loss, from the pretrained checkpoint or, for the
ablation (paper Table 1), from a random backbone of the same shape."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common import distributed
from common.training import cosine_lr, init_wandb, latest_checkpoint, load_trainer_state, save_checkpoint
from policies.data import PageSequences
from policies.modeling_genpage import GenPageForPageReward
from reward_model.config import RewardModelConfig
from reward_model.data import EntityTargets, RewardNormalization, collate_pages
from reward_model.heads import get_reward_head

HEAD_PREFIX = "score."  # the reward head's parameters; everything else trainable is the backbone


def _from_pretrained(pretrained_dir: str | Path, seed: int, **head: object) -> GenPageForPageReward:
    """The pretrained backbone (lm_head and the output content projection are left out); `score` is new.
    head: config fields of the reward head (reward_head, feedback_rewards, thumbs_up_reward)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the new head's initialization
    return AutoModelForSequenceClassification.from_pretrained(pretrained_dir, dtype=torch.float32, **head)


def _from_scratch(pretrained_dir: str | Path, seed: int, **head: object) -> GenPageForPageReward:
    """Same config, randomly initialized weights; the frozen content table (catalog data, not learned) is
    copied so both initializations see the same inputs."""
    pretrained = _from_pretrained(pretrained_dir, seed, **head)
    torch.manual_seed(seed)
    model = GenPageForPageReward(pretrained.config)
    with torch.no_grad():
        model.model.content_embeddings.copy_(pretrained.model.content_embeddings)
    return model


INITIALIZERS: dict[str, Callable[..., GenPageForPageReward]] = {
    "pretrained": _from_pretrained,
    "scratch": _from_scratch,
}


def shrink_perturb(model: GenPageForPageReward, shrink: float, seed: int) -> None:
    """Warm start by shrink and perturb (Ash & Adams, 2020): every weight matrix of the transformer layers
    becomes shrink * w + (1 - shrink) * noise, the noise drawn like a fresh initialization (normal, std
    config.initializer_range). Embeddings, norms and the head keep their values. shrink 1 is a no-op."""
    if shrink >= 1.0:
        return
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:  # [out, in] projections of attention and MLP
                noise = torch.randn(p.shape, generator=gen) * std
                p.mul_(shrink).add_(noise.to(p.device, p.dtype), alpha=1.0 - shrink)


def build_reward_model(pretrained_dir: str | Path, init: str, norm: RewardNormalization, seed: int = 0,
                       reward_head: str = "entity_sum", mean_page_tokens: float = 1.0,
                       shrink: float = 1.0, targets: EntityTargets | None = None) -> GenPageForPageReward:
    """A reward model whose config carries the target normalization and the head (saved with every
    checkpoint), its score layer started by the head (reward_model.heads: entity_sum at the mean reward spread
    evenly over a mean-length page; entity_feedback, which takes the reward system from `targets`, at the
    logged base rates of each feedback type and of a thumbs-up). shrink < 1: the pretrained initialization's
    layers are shrunk and perturbed (shrink_perturb); the random initialization is left as it is."""
    if init not in INITIALIZERS:
        raise ValueError(f"unknown reward-model initialization {init!r}; known: {sorted(INITIALIZERS)}")
    head = get_reward_head(reward_head)
    model = INITIALIZERS[init](pretrained_dir, seed, reward_head=reward_head, **head.config_fields(targets))
    if init == "pretrained":
        shrink_perturb(model, shrink, seed)
    model.config.architectures = ["GenPageForPageReward"]
    model.config.reward_mean, model.config.reward_std = norm.mean, norm.std
    with torch.no_grad():
        head.init_score(model.score, norm, targets, mean_page_tokens)
    return model


def reward_mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE on standardized page rewards (a head's per-title loss is added by `fit`, reward_model.heads).
    pred, target [B] -> (scalar loss, metrics)"""
    err = pred.float() - target.float()
    page_loss = (err ** 2).mean()
    return page_loss, {"rm/train_loss": page_loss.item(), "rm/train_bias": err.mean().item()}


def predict(model, prompts: list[list[int]], pages: list[list[int]], pad_id: int, eop_id: int,
            batch_size: int = 128) -> np.ndarray:
    """Standardized scores of (context, page) pairs, model in eval mode.  -> [N]

    Sequences are batched by length (less padding); the result is in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(p) + len(g) for p, g in zip(prompts, pages)], kind="stable")
    out = np.empty(len(prompts), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate_pages([prompts[i] for i in idx], [pages[i] for i in idx], pad_id, eop_id)
            out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].double().cpu().numpy()  # [b]
    model.train(was_training)
    return out


class WeightAverage:
    """Exponential moving average of the trainable weights (decay per step), the weights that are evaluated
    and saved: page rewards are noisy targets, and averaging the last few hundred steps' weights smooths out
    the last batches' noise. decay 0 keeps the live weights."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, state: list[torch.Tensor] | None = None):
        self.params, self.decay = params, decay
        self.avg = state if state is not None else [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.decay == 0:
            return
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights are forgotten fast
        for a, p in zip(self.avg, self.params):
            a.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges live and averaged weights (call twice to restore)."""
        if self.decay == 0:
            return
        for a, p in zip(self.avg, self.params):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)


@dataclass
class FitResult:
    """A finished training run: the model and what happened on the way."""

    model: GenPageForPageReward
    history: list[dict] = field(default_factory=list)  # {"step", "valid_loss"} at each evaluation (step 0 included)
    resumed_from: int | None = None  # step a killed run resumed from
    train_s: float = 0.0  # wall time of the optimizer steps of this process
    train_tokens: int = 0  # tokens (context + page) those steps trained on, all ranks together
    wandb_run: object = None  # the open wandb run (the caller logs the evaluation and finishes it)


def fit(init: str, cfg: RewardModelConfig, train: PageSequences, valid: PageSequences, norm: RewardNormalization,
        pad_id: int, eop_id: int, ckpt_dir: Path, wandb_dir: Path, name: str,
        targets: EntityTargets | None = None, bar_position: int = 0,
        ranks: distributed.Ranks = distributed.Ranks()) -> FitResult:
    """Trains one reward model with checkpoints in ckpt_dir; a killed run resumes from the last one.

    train/valid page_reward are in reward units; the loss is on (reward - mean) / std (norm).
    targets: the logged outcome of each page token of the train impressions (data.entity_targets), where the
    head needs them (`needs_entity_targets`: entity_feedback for its reward system and, with
    cfg.entity_loss_weight > 0, the feedback its per-title outputs are trained on; entity_sum when
    cfg.entity_loss_weight > 0, its per-title rewards regressing the logged entity rewards).
    ranks: under torchrun, this rank of the data-parallel group (common/distributed.py): each rank trains on its
    rows of the same global batch through DDP, rank 0 alone evaluates, checkpoints and logs."""
    from transformers import AutoModelForSequenceClassification

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(ranks)  # every rank resumes from the same checkpoint
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        model = AutoModelForSequenceClassification.from_pretrained(resume, dtype=torch.float32)
    else:
        mean_tokens = float(np.mean([len(g) for g in train.pages])) + 1.0  # + [EOP]
        model = build_reward_model(cfg.pretrained_dir, init, norm, cfg.seed, cfg.reward_head, mean_tokens,
                                   cfg.shrink_perturb, targets)
    model.train()
    trained = distributed.wrap(model, ranks)  # forward/backward through DDP: gradients averaged over the ranks
    reward_head = get_reward_head(model.config.reward_head)
    entity_loss = None  # the head's per-title loss, weighted by cfg.entity_loss_weight
    if cfg.entity_loss_weight > 0 and reward_head.needs_entity_targets(cfg.entity_loss_weight):
        if targets is None:
            raise ValueError("entity_loss_weight > 0 needs the logged outcome of each title of the train impressions "
                             "(data.entity_targets)")
        entity_loss = reward_head.entity_loss(targets)
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(HEAD_PREFIX)]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD_PREFIX)]
    peak = [cfg.backbone_lr, cfg.lr]
    optimizer = torch.optim.AdamW([{"params": backbone}, {"params": head}], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    start, extra = (load_trainer_state(resume, optimizer) if resume is not None else (0, {}))
    valid_eval = valid.subset(range(min(len(valid), cfg.eval_sequences)))
    target_valid = norm.normalize(valid_eval.page_reward)

    ema = WeightAverage(backbone + head, cfg.ema_decay, extra.get("ema"))

    def valid_loss() -> float:  # of the averaged weights, the ones that are saved
        ema.swap()
        pred = predict(model, valid_eval.prompts, valid_eval.pages, pad_id, eop_id, cfg.score_batch_size)
        ema.swap()
        return float(np.mean((pred - target_valid) ** 2))

    history = extra.get("history", [])
    if not history and ranks.is_main:  # the untrained model's loss: the reference the smoke test compares to
        history.append({"step": 0, "valid_loss": valid_loss()})
    if resume is not None and ranks.is_main:
        print(f"[{name}] resuming from {resume} at step {start}")
    run = init_wandb(cfg.wandb_project, wandb_dir, {**dataclasses.asdict(cfg), "init": init},
                     cfg.wandb_mode if ranks.is_main else "disabled", name, extra.get("wandb_id"))
    target_train = torch.as_tensor(norm.normalize(train.page_reward), dtype=torch.float32)  # [N]

    t_train, tokens = 0.0, 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, unit="step", position=bar_position,
               disable=not ranks.is_main)
    for step in bar:
        batch_rng = np.random.default_rng([cfg.seed, step])  # batch order is a function of the step: resumable
        idx = batch_rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        idx = ranks.shard(idx)  # this rank's rows of the global batch (the page MSE: equal shares, DDP's average)
        if ranks.distributed:  # each rank its own fallback-token draws, a function of the step (resumable)
            torch.manual_seed(int(np.random.default_rng([cfg.seed, step, ranks.rank]).integers(2**62)))
        batch = collate_pages([train.prompts[i] for i in idx], [train.pages[i] for i in idx], pad_id, eop_id)
        for group, base in zip(optimizer.param_groups, peak):
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup_steps, base)
        prompts, T = [train.prompts[i] for i in idx], batch["input_ids"].shape[1]
        t0 = time.perf_counter()
        out = trained(**batch)
        loss, metrics = reward_mse(out.logits[:, 0], target_train[idx])
        if entity_loss is not None:
            extra, titles, extra_metrics = entity_loss(out, idx, prompts, T)
            metrics.update(extra_metrics)
            # DDP averages the ranks' gradients: each rank's per-title mean weighs by its share of all titles
            share = distributed.global_scale(titles, distributed.global_sum(titles, ranks), ranks)
            loss = loss + cfg.entity_loss_weight * share * extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(backbone + head, cfg.grad_clip)
        optimizer.step()
        ema.update(step)
        t_train += time.perf_counter() - t0
        tokens += int(distributed.global_sum(int(batch["attention_mask"].sum()), ranks))
        metrics.update({"rm/tokens_per_s": tokens / t_train, "rm/grad_norm": grad_norm.item(), "rm/lr_head": optimizer.param_groups[1]["lr"],
                        "rm/lr_backbone": optimizer.param_groups[0]["lr"]})
        if ranks.is_main and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps):
            metrics["rm/valid_loss"] = valid_loss()
            history.append({"step": step + 1, "valid_loss": metrics["rm/valid_loss"]})
            bar.set_postfix(loss=f"{loss.item():.3f}", valid=f"{metrics['rm/valid_loss']:.3f}")
        run.log(metrics, step=step + 1)
        if ranks.is_main and ((step + 1) % cfg.checkpoint_interval == 0 or step + 1 == cfg.steps):
            state = {"history": history, "wandb_id": run.id, **({"ema": ema.avg} if cfg.ema_decay else {})}
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, state)
    ema.swap()  # the averaged weights are the result
    model.eval()
    return FitResult(model, history, start if resume is not None else None, t_train, tokens, run)
