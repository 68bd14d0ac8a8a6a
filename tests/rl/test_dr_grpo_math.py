"""Dr. GRPO (arXiv 2503.20783) as the recipe configures verl: advantages and loss aggregation against
hand-worked values, computed by verl's own functions with the options our config sets."""

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from rl.config import DrGrpoConfig, RunPaths, SequenceLengths, compose_verl_config, verl_overrides  # noqa: E402

LENGTHS = SequenceLengths(prompt=90, page=55)  # the default world's: 6 rows x (1 + 8 titles) + [EOP]


@pytest.fixture(scope="module")
def verl_cfg(tmp_path_factory):
    paths = RunPaths(tmp_path_factory.mktemp("run"), seed=0)
    return compose_verl_config(verl_overrides(DrGrpoConfig(), "runs/pretrain/model", paths, seed=0, cpu=True,
                                              lengths=LENGTHS))


def test_config_selects_dr_grpo(verl_cfg):
    assert verl_cfg.algorithm.adv_estimator == "grpo"
    assert verl_cfg.algorithm.norm_adv_by_std_in_grpo is False
    assert verl_cfg.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert verl_cfg.actor_rollout_ref.actor.loss_scale_factor == 55
    assert verl_cfg.actor_rollout_ref.actor.use_kl_loss is True
    assert verl_cfg.actor_rollout_ref.actor.kl_loss_type == "low_var_kl"
    # Default old_log_probs=rollout: verl's bypass of the old-log-prob pass, our registered loss in the workers.
    assert verl_cfg.algorithm.rollout_correction.bypass_mode is True
    assert verl_cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "genpage_vanilla"
    assert "rl.policy_loss" in verl_cfg.actor_rollout_ref.model.external_lib
    assert verl_cfg.actor_rollout_ref.rollout.calculate_log_probs is True  # what the bypass reads


def test_recompute_keeps_verls_old_log_prob_pass(tmp_path):
    cfg = DrGrpoConfig(old_log_probs="recompute")
    c = compose_verl_config(verl_overrides(cfg, "runs/pretrain/model", RunPaths(tmp_path, 0), seed=0, cpu=True,
                                           lengths=LENGTHS))
    assert c.algorithm.rollout_correction.bypass_mode is False
    assert c.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"


def test_on_policy_loss_is_verls_vanilla_plus_the_probs_check(verl_cfg):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
    from verl.utils.config import omega_conf_to_dataclass

    import rl.policy_loss  # noqa: F401  (registers the loss, as the workers' external_lib import does)
    from rl import page_metrics as pm

    actor = omega_conf_to_dataclass(verl_cfg.actor_rollout_ref.actor)
    fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    # Token probabilities: rollout 0.5, 0.25 | 0.8 (+ a padding token whose 0.9 vs 0.1 must not count);
    # trainer 0.5, 0.2 | 0.81 -> max |diff| over the response = 0.05.
    rollout = torch.tensor([[0.5, 0.25], [0.8, 0.9]]).log()
    trainer = torch.tensor([[0.5, 0.2], [0.81, 0.1]]).log().requires_grad_()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    loss, metrics = fn(old_log_prob=rollout, log_prob=trainer, advantages=adv, response_mask=mask,
                       loss_agg_mode=actor.loss_agg_mode, config=actor)
    ref_loss, ref_metrics = compute_policy_loss_vanilla(old_log_prob=rollout, log_prob=trainer, advantages=adv,
                                                        response_mask=mask, loss_agg_mode=actor.loss_agg_mode, config=actor)
    assert metrics[pm.ROLLOUT_PROBS_DIFF_MAX] == pytest.approx(0.05, abs=1e-6)
    torch.testing.assert_close(loss, ref_loss)
    assert {k: v for k, v in metrics.items() if k != pm.ROLLOUT_PROBS_DIFF_MAX} == ref_metrics
    loss.backward()  # the check itself carries no gradient
    assert trainer.grad is not None


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
