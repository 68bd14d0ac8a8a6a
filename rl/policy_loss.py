"""The policy loss of on-policy Dr. GRPO when the sampler's log-probs stand in for the old policy's.

With `old_log_probs=rollout` (rl.config) verl skips its old-log-prob pass (`algorithm.rollout_correction.
bypass_mode`): the log-probs vLLM returned with the sampled pages are the PPO ratio's denominator. That is the
same quantity the pass would recompute, because sampler and trainer run the same fp32 weights with the same
rule masks (up to float rounding). The check that they agree, `training/rollout_probs_diff_max`, which verl
computes in the skipped pass, moves here: the update's forward computes the trainer's log-probs anyway, before
any optimizer step of the batch.

Registered with verl's policy-loss registry; the actor workers import this module through
`actor_rollout_ref.model.external_lib` and select the loss with `actor.policy_loss.loss_mode`. (verl 0.9.1's
bypass also sets `loss_mode=bypass_mode` on the driver's config, which the engine workers, configured at start,
never see; they run the loss named here: a run shows no `rollout_corr/*` metrics and `actor/ppo_kl` 0, see
docs/experiments/dr_grpo.md.)
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, register_policy_loss

from rl import page_metrics as pm
from rl.config import LOSS_MODE  # actor.policy_loss.loss_mode of this loss


def probs_diff_max(rollout_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor) -> float:
    """max |p_rollout - p_trainer| over the response tokens (verl's training/rollout_probs_diff_max).
    rollout_log_prob, log_prob, response_mask [B, T] -> scalar"""
    mask = response_mask.bool()
    if not mask.any():
        return 0.0
    diff = (rollout_log_prob.float().exp() - log_prob.detach().float().exp()).abs()  # [B, T]
    return float(diff[mask].max())


@register_policy_loss(LOSS_MODE)
def genpage_vanilla_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                         response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                         rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's vanilla PPO-clip loss, unchanged, plus the sampler/trainer agreement of the micro-batch.

    old_log_prob: here the rollout's log-probs [B, T]; log_prob: the trainer's, with gradient [B, T];
    advantages, response_mask [B, T]. verl averages the metric over micro-batches: with the default config
    (one mini-batch, one micro-batch, one epoch) it is the max over the step's tokens, measured before the
    step's update; with more mini-batches, later ones also see the policy move."""
    loss, metrics = compute_policy_loss_vanilla(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                                                response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                                                rollout_is_weights=rollout_is_weights)
    metrics[pm.ROLLOUT_PROBS_DIFF_MAX] = probs_diff_max(old_log_prob, log_prob, response_mask)
    return loss, metrics
