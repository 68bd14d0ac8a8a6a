"""The training side of each reward-model head (paper section 5.3): the config fields it needs, how its
`score` layer starts, whether it needs each title's logged outcome, and its extra per-title loss.

Each head is registered under the name of its forward read-out (policies.reward_heads, what a checkpoint
runs); `get_reward_head(name)` returns it, and an unknown name lists the known ones:

    head = get_reward_head(cfg.reward_head)
    if head.needs_entity_targets(cfg.entity_loss_weight): targets = reward_model.data.entity_targets(...)

Shapes: B sequences, T positions, F feedback types.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from policies.reward_heads import REWARD_READOUTS, HeadRegistry, RewardReadout
from reward_model.data import EntityTargets, RewardNormalization, collate_token_targets

DEFAULT_REWARD_HEAD = "entity_feedback"

# (the model's output: a PageRewardOutput or RewardReadout, the batch's train-impression indices, their prompts,
#  the batch width T) -> (scalar loss: a mean over the batch's titles, the number of titles it averages, metrics);
#  the count lets a data-parallel run weigh each rank's mean by its share of the whole batch's titles.
EntityLoss = Callable[[RewardReadout, list[int], list[list[int]], int], tuple[torch.Tensor, int, dict[str, float]]]


def feedback_nll(logits: torch.Tensor, feedback: torch.Tensor, thumbs: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the logged feedback of each title: cross-entropy of its feedback type
    plus the binary cross-entropy of its thumbs-up. Tokens whose feedback is NaN (row tokens, [EOP], the
    prompt, padding) are left out.  logits [B, T, F + 1]; feedback, thumbs [B, T] -> scalar"""
    has = ~torch.isnan(feedback)  # [B, T]
    z = logits.float()[has]  # [N, F + 1]
    return (nn.functional.cross_entropy(z[:, :-1], feedback[has].long())
            + nn.functional.binary_cross_entropy_with_logits(z[:, -1], thumbs[has].float()))


def token_reward_mse(token_pred: torch.Tensor, token_target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """MSE of per-token rewards on the tokens whose target is not NaN (the page's titles), in units of scale.
    token_pred, token_target [B, T] (reward units) -> scalar"""
    has = ~torch.isnan(token_target)
    return (((token_pred.float()[has] - token_target[has]) / scale) ** 2).mean()


class RewardHead:
    """A head's training side; subclasses are registered with `register_reward_head`. The defaults are those
    of a head with no per-title outputs."""

    name = ""

    def config_fields(self, targets: EntityTargets | None) -> dict[str, object]:
        """GenPageConfig fields besides reward_head that the head's read-out needs (saved with the checkpoint)."""
        return {}

    def init_score(self, score: nn.Linear, norm: RewardNormalization, targets: EntityTargets | None,
                   mean_page_tokens: float) -> None:
        """Starts the new score layer (called under no_grad); the default keeps the layer's initialization."""

    def needs_entity_targets(self, entity_loss_weight: float) -> bool:
        """Whether training needs each train title's logged outcome (reward_model.data.entity_targets)."""
        return False

    def entity_loss(self, targets: EntityTargets) -> EntityLoss | None:
        """The extra per-title loss (weighted by entity_loss_weight), built once per run; None: no such loss."""
        return None


REWARD_HEADS = HeadRegistry()  # `REWARD_HEADS.names()`: the known reward_head values


def register_reward_head(name: str):
    """Class decorator: registers an instance of a RewardHead subclass as head `name`, whose forward read-out
    must be registered in policies.reward_heads under the same name."""
    if name not in REWARD_READOUTS:
        raise ValueError(f"reward head {name!r} has no read-out: register it in policies.reward_heads first "
                         f"(known: {list(REWARD_READOUTS.names())})")
    return REWARD_HEADS.register(name)


def get_reward_head(name: str) -> RewardHead:
    """The registered head `name`; an unknown name raises ValueError listing the known ones."""
    return REWARD_HEADS.get(name)


@register_reward_head("entity_feedback")
class EntityFeedbackHead(RewardHead):
    """Takes the reward system from the logs; starts at the logged base rates of each feedback type and of a
    thumbs-up; the extra loss is the NLL of each title's logged feedback (feedback_nll)."""

    def config_fields(self, targets):
        if targets is None:
            raise ValueError("the entity_feedback head needs the logged feedback (data.entity_targets)")
        return {"feedback_rewards": targets.feedback_rewards, "thumbs_up_reward": targets.thumbs_up_reward}

    def init_score(self, score, norm, targets, mean_page_tokens):
        rates, thumbs = targets.base_rates()
        eps = 1e-6  # a type never logged starts (and, untrained, stays) near probability 0
        logit_thumbs = np.log(thumbs + eps) - np.log(1.0 - thumbs + eps)
        score.bias.copy_(torch.tensor([*np.log(rates + eps), logit_thumbs], dtype=score.bias.dtype))

    def needs_entity_targets(self, entity_loss_weight):
        return True  # the reward system is read off the logged feedback

    def entity_loss(self, targets):
        def loss(out, rows, prompts, T):
            feedback = collate_token_targets(prompts, [targets.feedback[i] for i in rows], T)  # [B, T] NaN off titles
            nll = feedback_nll(out.feedback_logits, feedback,
                               collate_token_targets(prompts, [targets.thumbs[i] for i in rows], T))
            return nll, int((~torch.isnan(feedback)).sum()), {"rm/train_feedback_nll": nll.item()}

        return loss


@register_reward_head("entity_sum")
class EntitySumHead(RewardHead):
    """Starts at the mean page reward spread evenly over a mean-length page; the extra loss (when weighted)
    regresses each title's reward on its logged entity reward, in units of the entity rewards' spread."""

    def init_score(self, score, norm, targets, mean_page_tokens):
        score.bias.fill_(norm.mean / max(mean_page_tokens, 1.0))

    def needs_entity_targets(self, entity_loss_weight):
        return entity_loss_weight > 0

    def entity_loss(self, targets):
        scale = float(np.nanstd(np.concatenate(targets.reward))) or 1.0  # entity rewards in units of their spread

        def loss(out, rows, prompts, T):
            token_target = collate_token_targets(prompts, [targets.reward[i] for i in rows], T)  # [B, T] NaN off titles
            mse = token_reward_mse(out.token_rewards, token_target, scale)
            return mse, int((~torch.isnan(token_target)).sum()), {"rm/train_entity_loss": mse.item()}

        return loss


@register_reward_head("last")
class LastTokenHead(RewardHead):
    """The paper's sequence-regression head: the page loss only, the layer's own initialization."""
