"""Token credit (rl/advantage.py): reward-to-go minus the group's mean at each position, against hand-worked
values; equal to Dr. GRPO's advantage when every page has the same length and its reward on the last token."""

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from rl import page_metrics as pm  # noqa: E402
from rl.advantage import TOKEN_CREDIT, apply_token_credit, compute_token_credit_advantage, dense_rewards  # noqa: E402


def test_reward_to_go_minus_the_group_mean_at_each_position_by_hand():
    # Group "a": page 0 rewards 1, 0, 2, 0.5 -> reward-to-go 3.5, 2.5, 2.5, 0.5;
    #            page 1 rewards 0, 3, -1 (3 tokens, then padding whose 9 must not count) -> 2, 2, -1, 0.
    #            baseline per position: 2.75, 2.25, 0.75, 0.25 (the ended page 1 contributes 0 at position 3).
    # Group "b": one page, rewards 1, 1 -> baseline 0 (verl's GRPO convention), advantage = reward-to-go 2, 1.
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 3.0, -1.0, 9.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    adv, returns = compute_token_credit_advantage(rewards, mask, np.array(["a", "a", "b"]))
    torch.testing.assert_close(returns, torch.tensor([[3.5, 2.5, 2.5, 0.5], [2.0, 2.0, -1.0, 0.0], [2.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.25, 1.75, 0.25], [-0.75, -0.25, -1.75, 0.0],
                                                  [2.0, 1.0, 0.0, 0.0]]))


def test_reward_on_the_last_token_of_equal_length_pages_is_dr_grpo():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

    rewards = torch.zeros(5, 3)
    rewards[:, -1] = torch.tensor([1.0, 2.0, 6.0, 4.0, 3.0])
    mask = torch.ones(5, 3)
    index = np.array(["a", "a", "a", "b", "b"])
    adv, _ = get_adv_estimator_fn(TOKEN_CREDIT)(token_level_rewards=rewards, response_mask=mask, index=index)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv, grpo)


def test_dense_rewards_must_sum_to_the_page_score():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = dense_rewards(np.array([[0.5, 1.0, 7.0]]), torch.tensor([1.5]), mask)  # the 7 sits on padding
    torch.testing.assert_close(r, torch.tensor([[0.5, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="sum to 1.5000, its score is 2.0000"):
        dense_rewards(np.array([[0.5, 1.0, 0.0]]), torch.tensor([2.0]), mask)


def test_apply_token_credit_replaces_the_step_batchs_advantages():
    from verl import DataProto

    scores = torch.zeros(2, 3)
    scores[0, 2], scores[1, 1] = 3.0, 1.0  # verl's sparse page scores on each page's last token
    batch = DataProto.from_dict(
        tensors={"token_level_scores": scores, "response_mask": torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
                 "advantages": torch.full((2, 3), 99.0)},
        non_tensors={"uid": np.array(["u", "u"], dtype=object),
                     pm.EXTRA_TOKEN_REWARD: np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])})
    metrics = apply_token_credit(batch)
    # reward-to-go 3, 2, 1 and 1, 1, 0; group mean per position 2, 1.5, 0.5
    torch.testing.assert_close(batch.batch["advantages"], torch.tensor([[1.0, 0.5, 0.5], [-1.0, -0.5, 0.0]]))
    torch.testing.assert_close(batch.batch["token_level_rewards"], torch.tensor([[1.0, 1, 1], [0, 1, 0]]))
    # within-page std of the advantages: page 0 (1, 0.5, 0.5) -> 0.2357; page 1 (-1, -0.5) -> 0.25
    assert metrics[pm.CREDIT_SPREAD] == pytest.approx((np.std([1, 0.5, 0.5]) + 0.25) / 2)
    batch.non_tensor_batch.pop(pm.EXTRA_TOKEN_REWARD)
    with pytest.raises(ValueError, match="carry no token_rewards"):
        apply_token_credit(batch)
