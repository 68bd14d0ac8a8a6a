"""The per-step page metrics the trainer hook adds to verl's metrics, on a hand-made rollout batch."""

import numpy as np
import pytest
import torch

pytest.importorskip("verl")


def test_step_page_metrics_by_hand():
    from verl import DataProto

    from rl import page_metrics as pm
    from rl.trainer import step_page_metrics

    # Vocabulary of 6 tokens: 3 and 4 are titles, 5 is a fallback title token (not counted), 0 padding.
    entity_token = np.array([False, False, False, True, True, False])
    responses = torch.tensor([[3, 3, 5, 2], [4, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.zeros(2, 4)
    scores[0, 3], scores[1, 1] = 1.5, -0.5  # the page reward sits on its last token
    batch = DataProto.from_dict(
        tensors={"responses": responses, "response_mask": mask, "token_level_scores": scores},
        non_tensors={"rm_reward": np.array([2.0, 0.0]), "true_reward": np.array([3.0, 1.0]),
                     "diversity": np.array([0.5, 0.7]), "violations/dedup": np.array([1.0, 0.0]),
                     "violations/total": np.array([0.0, 0.0]), "uid": np.array(["a", "b"], dtype=object)})
    m = step_page_metrics(batch, entity_token)
    assert m[pm.TRAIN_REWARD] == pytest.approx(0.5)  # (1.5 - 0.5) / 2
    assert m[pm.RM_REWARD] == 1.0 and m[pm.TRUE_REWARD] == 2.0 and m[pm.DIVERSITY] == pytest.approx(0.6)
    assert m["rules/violations/dedup"] == 0.5 and m[pm.VIOLATING_PAGES] == 0.5
    assert m[pm.COVERAGE] == 1.0  # titles 3 and 4 both shown, of the vocabulary's 2 titles
    assert "uid" not in " ".join(m)


def test_old_log_prob_pass_metrics_move_from_the_update():
    from rl import page_metrics as pm
    from rl.trainer import old_log_prob_pass_metrics

    # Bypassed pass: verl prefixed the update's check with actor/; it goes back under verl's own name.
    update = {"actor/training/rollout_probs_diff_max": 2e-6, "actor/entropy_loss": 1.9, "actor/kl_loss": 0.01}
    moved = old_log_prob_pass_metrics(update)
    assert moved == {pm.ROLLOUT_PROBS_DIFF_MAX: 2e-6, pm.ENTROPY: 1.9}
    assert "actor/training/rollout_probs_diff_max" not in update
    # The pass ran: verl logged both itself; nothing is added or overwritten.
    assert old_log_prob_pass_metrics({"actor/entropy_loss": 0.3, "actor/pg_loss": 0.1}) == {}


def test_without_an_entropy_in_the_update_the_entropy_is_estimated_from_the_sampled_tokens():
    """-log p of each sampled response token, averaged over the response tokens only (padding excluded); for a
    uniform sampler over 4 tokens that is exactly its entropy, log 4."""
    import math

    import torch
    from verl import DataProto

    from rl import page_metrics as pm
    from rl.trainer import old_log_prob_pass_metrics, sampled_entropy

    logp = torch.tensor([[math.log(0.25)] * 3, [math.log(0.5), math.log(0.25), 0.0]])  # [B=2, T=3]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = DataProto.from_dict({"rollout_log_probs": logp, "response_mask": mask})
    assert sampled_entropy(batch) == pytest.approx((4 * math.log(4) + math.log(2)) / 5)
    moved = old_log_prob_pass_metrics({"actor/training/rollout_probs_diff_max": 1e-6}, batch)
    assert moved[pm.ENTROPY] == pytest.approx(sampled_entropy(batch))
    uniform = DataProto.from_dict({"rollout_log_probs": torch.full((3, 5), -math.log(4)), "response_mask": torch.ones(3, 5)})
    assert sampled_entropy(uniform) == pytest.approx(math.log(4))


def test_reward_after_rollout_takes_verls_colocated_reward_path(monkeypatch):
    """genpage.reward_after_rollout: the trainer counts as having a colocated reward model, so verl's init_workers
    builds the agent loop without streaming reward handles and fit scores the whole batch (compute_rm_score);
    the role that path looks up is the shared pool. Streamed (the flag off): verl's defaults, untouched."""
    import inspect

    from omegaconf import OmegaConf
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.utils import Role

    from rl.trainer import GenPagePPOTrainer

    class Pools:
        def __init__(self):
            self.mapping = {Role.ActorRolloutRef: "global_pool"}

    def prepared(flag: bool):
        trainer = object.__new__(GenPagePPOTrainer)
        trainer.config = OmegaConf.create({"genpage": {"reward_after_rollout": flag}})
        trainer.use_rm, trainer.resource_pool_manager = False, Pools()
        return trainer

    after = prepared(True)
    after._score_after_rollout()
    assert after.use_rm and after.resource_pool_manager.mapping[Role.RewardModel] == "global_pool"
    # What the flag relies on in verl: use_rm alone turns the streaming off and the batch scoring on.
    init, fit = inspect.getsource(RayPPOTrainer.init_workers), inspect.getsource(RayPPOTrainer.fit)
    assert "enable_agent_reward_loop = not self.use_rm or self.config.reward.reward_model.enable_resource_pool" in init
    assert 'if self.use_rm and "rm_scores" not in batch.batch.keys():' in fit

    streamed = prepared(False)
    calls = []
    monkeypatch.setattr(RayPPOTrainer, "init_workers", lambda self: calls.append(self.use_rm))
    streamed.init_workers()
    prepared(True).init_workers()
    assert calls == [False, True] and Role.RewardModel not in streamed.resource_pool_manager.mapping

    # The batch is scored in the trainer's process, so no reward worker is started; streamed keeps one.
    from pathlib import Path

    from rl.config import DrGrpoConfig, RunPaths, SequenceLengths, verl_overrides

    def workers(timing):
        o = verl_overrides(DrGrpoConfig(reward_timing=timing), "m", RunPaths(Path("/tmp/x"), 0), seed=0, cpu=True,
                           lengths=SequenceLengths(90, 55))
        return [x for x in o if x.startswith("reward.num_workers=")]

    assert workers("after_rollout") == ["reward.num_workers=0"] and workers("streamed") == ["reward.num_workers=1"]
    assert "_compute_reward_colocate" in GenPagePPOTrainer.__dict__  # verl's colocated hook, replaced
    assert "self.reward_loop_manager.compute_rm_score(batch)" in inspect.getsource(RayPPOTrainer._compute_reward_colocate)
