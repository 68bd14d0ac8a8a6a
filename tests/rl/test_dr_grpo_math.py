"""Dr. GRPO (arXiv 2503.20783) as the recipe configures verl: advantages and loss aggregation against
hand-worked values, computed by verl's own functions with the options our config sets."""

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from rl.config import DrGrpoConfig, RunPaths, compose_verl_config, verl_overrides  # noqa: E402


@pytest.fixture(scope="module")
def verl_cfg(tmp_path_factory):
    cfg = DrGrpoConfig(max_page_tokens=55)
    paths = RunPaths(tmp_path_factory.mktemp("run"), seed=0)
    return compose_verl_config(verl_overrides(cfg, "runs/pretrain/model", paths, seed=0, cpu=True))


def test_config_selects_dr_grpo(verl_cfg):
    assert verl_cfg.algorithm.adv_estimator == "grpo"
    assert verl_cfg.algorithm.norm_adv_by_std_in_grpo is False
    assert verl_cfg.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert verl_cfg.actor_rollout_ref.actor.loss_scale_factor == 55
    assert verl_cfg.actor_rollout_ref.actor.use_kl_loss is True
    assert verl_cfg.actor_rollout_ref.actor.kl_loss_type == "low_var_kl"


def test_group_relative_advantage_without_std(verl_cfg):
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    # Group "a": rewards 1, 2, 6 -> mean 3 -> advantages -2, -1, 3 (GRPO would divide by std sqrt(7) = 2.6458).
    # Group "b": rewards 4, 4 -> advantages 0, 0 (no signal, and no 0/0 either).
    # The reward sits on each page's last token; the advantage is broadcast over the page's tokens.
    rewards = torch.zeros(5, 4)
    lengths = [4, 2, 3, 1, 4]
    for i, (r, n) in enumerate(zip([1.0, 2.0, 6.0, 4.0, 4.0], lengths)):
        rewards[i, n - 1] = r
    mask = (torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]).float()
    fn = get_adv_estimator_fn(verl_cfg.algorithm.adv_estimator)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=np.array(["a", "a", "a", "b", "b"]),
                norm_adv_by_std_in_grpo=verl_cfg.algorithm.norm_adv_by_std_in_grpo)
    expected = torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0])[:, None] * mask
    torch.testing.assert_close(adv, expected)


def test_loss_is_token_sum_over_constant(verl_cfg):
    from verl.trainer.ppo.core_algos import agg_loss

    actor = verl_cfg.actor_rollout_ref.actor
    # Two pages of 4 and 2 tokens: per-page token sums 1+2+3+4 = 10 and 5+6 = 11, mean over pages 10.5,
    # divided by the constant 55 (not by each page's length, not by the padded width 4): 10.5 / 55 = 0.190909.
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    loss = agg_loss(loss_mat, mask, actor.loss_agg_mode, loss_scale_factor=actor.loss_scale_factor)
    assert loss.item() == pytest.approx(10.5 / 55)
    # Padding the batch wider changes nothing: the divisor is a constant.
    wide = agg_loss(torch.nn.functional.pad(loss_mat, (0, 6)), torch.nn.functional.pad(mask, (0, 6)),
                    actor.loss_agg_mode, loss_scale_factor=actor.loss_scale_factor)
    assert wide.item() == pytest.approx(10.5 / 55)
