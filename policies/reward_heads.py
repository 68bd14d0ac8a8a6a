"""How the reward model reads a page score off the backbone's hidden states: one registered read-out per
`GenPageConfig.reward_head` (paper section 5.3).

This is the half of a reward head that a checkpoint needs to run (the width of its `score` layer and its
forward), so `GenPageForPageReward` builds from a checkpoint directory alone; how a head is initialized and
trained (its extra loss) is registered under the same name in reward_model.heads.

    "entity_feedback"  each page token's predicted feedback (a distribution over the reward system's feedback
                       types plus a thumbs-up probability) and its expected reward; the page reward is their sum
    "entity_sum"       one regressed reward per page token; the page reward is their sum
    "last"             one standardized scalar read at the last attended position (the end-of-page token): the
                       paper's sequence-regression head

Shapes: B sequences, T positions, H hidden size, F feedback types.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

ScoreLayer = Callable[[torch.Tensor], torch.Tensor]  # the model's `score` nn.Linear: [..., H] -> [..., outputs]


class RewardReadout(NamedTuple):
    """What a head reads off one batch.

    logits [B, 1]: the standardized page score, (page_reward - reward_mean) / reward_std.
    token_rewards [B, T]: each page token's reward in reward units, 0 outside the page (per-token heads; None else).
    feedback_logits [B, T, F + 1]: each token's feedback-type logits [..., :F] and thumbs-up logit [..., F]
        ("entity_feedback"; None else)."""

    logits: torch.Tensor
    token_rewards: torch.Tensor | None = None
    feedback_logits: torch.Tensor | None = None


class RewardReadoutHead:
    """The forward half of a reward head; subclasses are registered with `register_reward_readout`."""

    name = ""
    per_token = False  # the page score is a sum of per-token rewards (RewardReadout.token_rewards is set)

    def outputs(self, config) -> int:
        """Width of the score layer for `config` (a GenPageConfig); raises ValueError naming a missing field."""
        return 1

    def read(self, score: ScoreLayer, hidden: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, config) -> RewardReadout:
        """hidden [B, T, H], input_ids [B, T], attention_mask [B, T] or None -> RewardReadout."""
        raise NotImplementedError


class HeadRegistry:
    """Reward heads by name (verl's `register_policy_loss` style), one registry per side of a head (this
    module's read-outs, reward_model.heads' training sides)."""

    def __init__(self) -> None:
        self.heads: dict[str, object] = {}

    def names(self) -> tuple[str, ...]:
        """The known head names, sorted."""
        return tuple(sorted(self.heads))

    def __contains__(self, name: str) -> bool:
        return name in self.heads

    def register(self, name: str):
        """Class decorator: registers an instance of the class as head `name` (its `name` attribute set)."""

        def decorate(cls: type) -> type:
            if name in self.heads:
                raise ValueError(f"reward head {name!r} is registered twice")
            head = cls()
            head.name = name
            self.heads[name] = head
            return cls

        return decorate

    def get(self, name: str):
        """The head registered as `name`; an unknown name raises ValueError listing the known ones."""
        if name not in self.heads:
            raise ValueError(f"unknown reward_head {name!r}; known: {list(self.names())}")
        return self.heads[name]


REWARD_READOUTS = HeadRegistry()
register_reward_readout = REWARD_READOUTS.register  # @register_reward_readout(name) on a RewardReadoutHead subclass


def get_reward_readout(name: str) -> RewardReadoutHead:
    """The registered read-out of head `name`; an unknown name raises ValueError listing the known ones."""
    return REWARD_READOUTS.get(name)


def page_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, page_token_id: int) -> torch.Tensor:
    """[B, T] bool: the page tokens, i.e. attended positions after the last [PAGE] token."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # [1, T]
    boundary = ((input_ids == page_token_id).long() * (pos + 1)).amax(-1, keepdim=True)  # [B, 1]
    page = pos >= boundary  # boundary is the 1-based [PAGE] position: tokens after it
    return page & attention_mask.bool() if attention_mask is not None else page


def expected_feedback_reward(logits: torch.Tensor, feedback_rewards: torch.Tensor, thumbs_up_reward: float) -> torch.Tensor:
    """Expected reward of a predicted feedback: sum_f P(f) r_f + P(thumbs-up) r_thumbs.
    logits [..., F + 1] (F feedback-type logits, then the thumbs-up logit); feedback_rewards [F] -> [...]"""
    probs = torch.softmax(logits[..., :-1].float(), dim=-1)  # [..., F]
    return probs @ feedback_rewards.float() + torch.sigmoid(logits[..., -1].float()) * thumbs_up_reward


class _PerTokenReadout(RewardReadoutHead):
    """Page reward = sum of a reward per page token (rows, titles, [EOP]: the tokens after the last [PAGE]), the
    way a reward system builds a page reward from entity rewards."""

    per_token = True

    def outputs(self, config) -> int:
        if config.page_token_id is None:
            raise ValueError(f"the {self.name} reward head needs config.page_token_id (the prompt/page boundary)")
        return 1

    def token_outputs(self, score: ScoreLayer, hidden: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [B, T, H] -> (reward of every position [B, T] in reward units, feedback logits [B, T, F + 1] or None)."""
        raise NotImplementedError

    def read(self, score, hidden, input_ids, attention_mask, config) -> RewardReadout:
        page = page_positions(input_ids, attention_mask, config.page_token_id)  # [B, T]
        rewards, feedback_logits = self.token_outputs(score, hidden, config)
        token_rewards = rewards * page  # [B, T] reward units, 0 off the page
        std = config.reward_std or 1.0
        logits = ((token_rewards.sum(-1) - config.reward_mean) / std)[:, None]  # [B, 1]
        return RewardReadout(logits, token_rewards, feedback_logits)


@register_reward_readout("entity_feedback")
class EntityFeedbackReadout(_PerTokenReadout):
    """Each token's reward is the expected reward of its predicted feedback under the reward system
    (config.feedback_rewards per feedback type, config.thumbs_up_reward)."""

    def outputs(self, config) -> int:
        super().outputs(config)
        if not config.feedback_rewards:
            raise ValueError("the entity_feedback reward head needs config.feedback_rewards (the reward of each "
                             "feedback type); reward_model.data.entity_targets fits them from the logs")
        return len(config.feedback_rewards) + 1  # feedback types, then thumbs-up

    def token_outputs(self, score, hidden, config):
        feedback_logits = score(hidden)  # [B, T, F + 1]
        values = torch.tensor(config.feedback_rewards, device=hidden.device)  # [F]
        return expected_feedback_reward(feedback_logits, values, config.thumbs_up_reward), feedback_logits


@register_reward_readout("entity_sum")
class EntitySumReadout(_PerTokenReadout):
    """Each token's reward is regressed directly (one output)."""

    def token_outputs(self, score, hidden, config):
        return score(hidden)[..., 0], None  # [B, T] reward units


@register_reward_readout("last")
class LastTokenReadout(RewardReadoutHead):
    """One standardized scalar at the last attended position (the end-of-page token); works for left and right
    padding."""

    def read(self, score, hidden, input_ids, attention_mask, config) -> RewardReadout:
        B, T = hidden.shape[:2]
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=hidden.device)
        else:
            pos = torch.arange(T, device=hidden.device)[None, :]
            last = (attention_mask.long() * (pos + 1)).argmax(-1)  # [B]
        return RewardReadout(score(hidden[torch.arange(B, device=hidden.device), last]))  # [B, 1]
