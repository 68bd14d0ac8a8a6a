"""Token-level credit for Dr. GRPO: each page token's advantage from the rewards that come after it.

Plain Dr. GRPO gives every token of a page the same advantage, the page's reward minus its group's mean. The
reward model's per-token heads ("entity_feedback", "entity_sum") already split a page's reward into one
reward per token (reward_model.scoring.PageRewardScorer.score_tokens), the way the paper's WBC splits a
logged page into per-title targets. With `credit=token` (rl.config) a token is credited with its reward-to-go:

    G[t] = r[t] + r[t+1] + ... + r[last]              (r: per-token rewards of the page; they sum to its reward)
    A[t] = G[t] - mean over the page's group of G[t]   (the same position of every page sampled for the context)

The page's objective is unchanged: G[0] is the page reward, and a token cannot change the rewards of the
tokens before it, so dropping them from its return removes noise, not signal (the reward-to-go form of
REINFORCE: Williams, 1992; Sutton and Barto, 2018, section 13.3). The baseline is per position, a
time-dependent baseline over the group; a page that has ended contributes its remaining reward, 0. As in verl's
GRPO, a group of one has baseline 0, and nothing is divided by a standard deviation (Dr. GRPO). With the reward
on the last token only, every token of a page gets its page's reward minus the group's mean at its position.

verl's reward loop carries one score per page, so the reward manager sends the per-token rewards as reward
extra info (`EXTRA_TOKEN_REWARD`, only for training prompts) and `apply_token_credit` recomputes the
advantages from them before the actor update (rl/trainer.py), with the estimator registered here.

Shapes: B pages, T response positions.
"""

from __future__ import annotations

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from rl import page_metrics as pm

TOKEN_CREDIT = "genpage_token_credit"  # the estimator's name in verl's advantage-estimator registry


@register_adv_est(TOKEN_CREDIT)
def compute_token_credit_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                                   config=None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-to-go minus its group mean at the same position (module docstring).

    token_level_rewards, response_mask [B, T]; index [B]: the group (prompt) of each page
    -> (advantages [B, T], returns [B, T]: the reward-to-go), 0 off the response."""
    mask = response_mask.to(token_level_rewards.dtype)
    r = token_level_rewards * mask  # [B, T]
    returns = r.flip(-1).cumsum(-1).flip(-1)  # [B, T] G[t] = sum of r[t:]
    _, group = np.unique(np.asarray(index), return_inverse=True)
    group = torch.as_tensor(group.reshape(-1), dtype=torch.long)  # [B]
    n_groups = int(group.max()) + 1 if len(group) else 0
    sums = torch.zeros(n_groups, r.shape[1], dtype=r.dtype).index_add_(0, group, returns)  # [G, T]
    counts = torch.bincount(group, minlength=n_groups).to(r.dtype)  # [G]
    baseline = torch.where(counts[:, None] > 1, sums / counts[:, None], torch.zeros_like(sums))[group]  # [B, T]
    return (returns - baseline) * mask, returns * mask


def dense_rewards(token_rewards: np.ndarray, scores: torch.Tensor, response_mask: torch.Tensor,
                  tolerance: float = 1e-3) -> torch.Tensor:
    """The per-token rewards of a step's pages as verl's `token_level_rewards`, checked against the page scores
    verl trained on: each page's per-token rewards must sum to its score.

    token_rewards [B, T] (reward extra info); scores [B] (token_level_scores summed); response_mask [B, T]
    -> [B, T] float32, 0 off the response"""
    r = torch.as_tensor(np.asarray(token_rewards, dtype=np.float32)) * response_mask.float()  # [B, T]
    gap = (r.sum(-1) - scores.float()).abs()
    if len(gap) and float(gap.max()) > tolerance * max(1.0, float(scores.abs().max())):
        worst = int(gap.argmax())
        raise ValueError(f"page {worst}'s per-token rewards sum to {float(r[worst].sum()):.4f}, its score is "
                         f"{float(scores[worst]):.4f}: the reward manager's {pm.EXTRA_TOKEN_REWARD} and reward_score "
                         "disagree (they must come from the same reward-model pass)")
    return r


def within_page_spread(advantages: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Mean over pages of the standard deviation of the advantages of a page's tokens: 0 under page credit,
    where every token of a page shares one advantage.  advantages, response_mask [B, T] -> scalar"""
    m = response_mask.float()
    n = m.sum(-1).clamp(min=1.0)  # [B]
    mean = (advantages * m).sum(-1) / n
    var = (((advantages - mean[:, None]) * m) ** 2).sum(-1) / n
    return float(var.sqrt().mean()) if len(n) else 0.0


def apply_token_credit(batch) -> dict[str, float]:
    """Replaces a step batch's page-level advantages by token credit (in place): `token_level_rewards` become the
    per-token rewards of the reward extra info, `advantages` and `returns` those of the registered estimator.
    -> the step's credit metrics (`CREDIT_SPREAD`)"""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    if pm.EXTRA_TOKEN_REWARD not in batch.non_tensor_batch:
        raise ValueError(f"credit=token but the step's pages carry no {pm.EXTRA_TOKEN_REWARD}: the reward manager "
                         "sends them only when genpage.credit=token and the prompt's split is train")
    mask = batch.batch["response_mask"]
    rewards = dense_rewards(np.stack(batch.non_tensor_batch[pm.EXTRA_TOKEN_REWARD]),
                            batch.batch["token_level_scores"].sum(-1), mask)
    advantages, returns = get_adv_estimator_fn(TOKEN_CREDIT)(
        token_level_rewards=rewards, response_mask=mask, index=batch.non_tensor_batch["uid"])
    batch.batch["token_level_rewards"] = rewards
    batch.batch["advantages"] = advantages
    batch.batch["returns"] = returns
    return {pm.CREDIT_SPREAD: within_page_spread(advantages, mask)}
