"""verl's legacy PPO trainer (`RayPPOTrainer`, the `trainer.use_v1=False` path) with one addition: the page
metrics of each step's rollouts are logged with verl's own metrics.

verl stores each page's `reward_extra_info` (RM score, format score, ground-truth reward, diversity, rule
violations) in the batch but logs it only for validation. `GenPagePPOTrainer._update_actor` adds their
per-step means, and the catalog coverage of the step's pages, to the actor's metrics, which verl reduces and
logs with the rest of the step (`rl.page_metrics` names them). Without verl's old-log-prob pass
(`old_log_probs=rollout`), the update reports what that pass would have: the sampler/trainer agreement
(rl/policy_loss.py) under verl's own name, and the token entropy as `actor/entropy` (estimated from the sampler's
log-probs: `sampled_entropy`). With `genpage.credit=token`
the advantages are recomputed from the pages' per-token rewards before the update (rl/advantage.py: verl's
reward loop carries one score per page, and its fit has no hook between the reward and the advantage).
With `genpage.early_stop_patience` > 0 each step's validator score is recorded (rl/early_stopping.py) and, when
it stops improving, the next step becomes the run's last (verl decides a step is its last before running it),
so verl still saves, exports and validates that final policy. Nothing else about the algorithm changes.

The reference pass and the update see the batch without its per-page Python objects (`worker_view`): verl turns
every non-tensor field (the prompts' extra_info, every reward_extra_info key) into one tensordict object per page
in the driver before each call, and neither pass reads them; the step's tensors are the same.

`GenPageTaskRunner` is verl's `TaskRunner.run` (verl/trainer/main_ppo_v0.py, 0.9.1) with the trainer class
swapped, plus a loop over seeds that reuses the workers; `verl.trainer.main_ppo.run_ppo(config,
GenPageTaskRunner)` runs it. The copy is pinned to verl 0.9.1 (`TASK_RUNNER_COPY`, checked in
tests/rl/test_cpu_shims.py).
"""

from __future__ import annotations

import numpy as np
import ray
from verl.trainer.main_ppo_v0 import BaseTaskRunner
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from policies.tokenizer import is_title_token
from rl import page_metrics as pm
from rl.advantage import apply_token_credit
from rl.early_stopping import EarlyStopState
from rl.cpu_shims import VERL, UpstreamPin, warn_if_versions_differ


def step_page_metrics(batch, entity_token: np.ndarray) -> dict[str, float]:
    """Per-step means of the pages' reward extra info, plus catalog coverage of the step's pages.

    entity_token: [V] bool, real catalog titles (fallback tokens excluded)."""
    nt = batch.non_tensor_batch
    keys = [k for k in nt if k in (pm.EXTRA_RM, pm.EXTRA_FORMAT, pm.EXTRA_TRUE, pm.EXTRA_RECALL, pm.EXTRA_DIVERSITY, pm.EXTRA_ENTITIES,
                                   pm.EXTRA_RM_STD, pm.EXTRA_VALIDATOR)
            or k.startswith(pm.EXTRA_VIOLATIONS_PREFIX)]
    train_reward = batch.batch["token_level_scores"].sum(-1).numpy()  # [B] the sparse reward sits on the last token
    metrics = pm.rollout_metrics({k: np.asarray(nt[k], dtype=np.float64) for k in keys}, train_reward)
    responses = batch.batch["responses"].numpy()  # [B, T]
    mask = batch.batch["response_mask"].numpy().astype(bool)  # [B, T]
    shown = np.unique(responses[mask & entity_token[np.clip(responses, 0, len(entity_token) - 1)]])
    metrics[pm.COVERAGE] = len(shown) / max(int(entity_token.sum()), 1)
    return metrics


WORKER_NON_TENSOR_KEYS = frozenset({"multi_modal_inputs"})  # per-sample fields a verl trainer worker reads


def worker_view(batch):
    """The batch as the reference and actor workers need it: the same tensors and meta_info, only the non-tensor
    fields they read (`WORKER_NON_TENSOR_KEYS`). verl's `DataProto.to_tensordict` wraps every non-tensor value of
    every page in its own tensordict object, in the driver, before each worker call (about 0.5 s a call for
    128 pages with their extra_info and reward_extra_info here); the page metrics keep reading the full batch."""
    from verl import DataProto

    keep = {k: v for k, v in batch.non_tensor_batch.items() if k in WORKER_NON_TENSOR_KEYS}
    return DataProto(batch=batch.batch, non_tensor_batch=keep, meta_info=dict(batch.meta_info))


def old_log_prob_pass_metrics(actor_metrics: dict, batch=None) -> dict:
    """The metrics of verl's old-log-prob pass, from the update's when that pass is skipped: the update's
    `actor/training/rollout_probs_diff_max` (verl prefixes the actor's metrics), and the token entropy: the
    update's `actor/entropy_loss` where it computed one, else `sampled_entropy(batch)`. Empty when the pass ran
    (verl logged both itself)."""
    out = {}
    moved = "actor/" + pm.ROLLOUT_PROBS_DIFF_MAX
    if moved in actor_metrics:
        out[pm.ROLLOUT_PROBS_DIFF_MAX] = actor_metrics.pop(moved)
        if pm.ENTROPY not in actor_metrics and "actor/entropy_loss" in actor_metrics:
            out[pm.ENTROPY] = actor_metrics["actor/entropy_loss"]
        elif pm.ENTROPY not in actor_metrics and batch is not None and "rollout_log_probs" in batch.batch.keys():
            out[pm.ENTROPY] = sampled_entropy(batch)
    return out


def sampled_entropy(batch) -> float:
    """Mean token entropy of the policy that sampled the step's pages, estimated from its samples: the mean over
    response tokens of -log p(sampled token) (the sampler's log-probs, under the masks; E[-log p(x)] is the
    entropy). Free, where verl's exact entropy in the update costs a backward through every position's softmax."""
    logp = batch.batch["rollout_log_probs"]  # [B, T]
    mask = batch.batch["response_mask"].bool()  # [B, T]
    return float(-(logp[mask]).mean())


class GenPagePPOTrainer(RayPPOTrainer):
    """RayPPOTrainer that also logs page metrics and can stop early (see module docstring)."""

    _entity_token: np.ndarray | None = None

    def _early_stop_state(self) -> EarlyStopState | None:
        """The seed's early-stopping history (`genpage.early_stop_patience` > 0), else None."""
        if int(self.config.genpage.get("early_stop_patience", 0) or 0) < 1:
            return None
        from pathlib import Path

        return EarlyStopState.load(Path(self.config.trainer.default_local_dir).parent)  # the seed's run directory

    def fit(self):
        self.total_training_steps = int(self.config.trainer.total_training_steps)
        state = self._early_stop_state()
        if state is not None and state.stopped_at is not None:  # resumed after the decision: end where it said
            self.total_training_steps = min(self.total_training_steps, state.stopped_at)
        return super().fit()

    def _early_stop(self, metrics: dict) -> None:
        """Record the validator's score of this step's rollouts; on a stop, make the next step the last."""
        state = self._early_stop_state()
        if state is None or pm.VALIDATOR_REWARD not in metrics:
            return
        g = self.config.genpage
        if state.record(self.global_steps, metrics[pm.VALIDATOR_REWARD], int(g.early_stop_patience), int(g.early_stop_window)):
            self.total_training_steps = min(self.total_training_steps, state.stopped_at)
            print(f"[genpage] early stop: the validator's reward has not improved for {g.early_stop_patience} steps; "
                  f"step {state.stopped_at} is the last")
        metrics[pm.EARLY_STOP_LAST_STEP] = float(self.total_training_steps)

    def init_workers(self):
        if self.config.genpage.get("reward_after_rollout", False):
            self._score_after_rollout()
        super().init_workers()

    def _score_after_rollout(self) -> None:
        """Score each step's pages in one batch after the rollout (`genpage.reward_after_rollout`), instead of
        streaming every page to the reward worker as it finishes. That is verl's own path for a reward model that
        shares the rollout's devices (`use_rm` without a resource pool of its own): the agent loop gets no reward
        handles, and the trainer calls the reward loop's `compute_rm_score` on the whole batch, through the same
        reward workers and `GenPageRewardManager`. The reward model is this project's, not verl's (no
        `reward.reward_model`), so the role that path looks up gets the shared pool, as verl's own colocated
        reward model does (`add_reward_model_resource_pool`); nothing is placed on it. The batch is then scored in this
        process (`_compute_reward_colocate`), so no reward worker is started (`reward.num_workers=0`, rl/config.py).
        verl's validation also calls `sleep_replicas` (a no-op without `free_cache_engine`) and re-syncs the
        unchanged weights."""
        from verl.trainer.ppo.utils import Role

        self.use_rm = True
        self.resource_pool_manager.mapping.setdefault(Role.RewardModel, "global_pool")

    _reward_manager = None

    def _compute_reward_colocate(self, batch):
        """The whole batch scored in this process by the project's reward manager (`score_batch`), where verl's
        colocated path sends it to the reward workers (`compute_rm_score`: the batch's Ray transfer, one
        `DataProto` slice and one task per page, the manager's batching window). Same judge, same output."""
        if self._reward_manager is None:
            from rl.reward_manager import GenPageRewardManager

            self._reward_manager = GenPageRewardManager(self.config, self.tokenizer)
        return self._reward_manager.score_batch(batch)

    def _compute_ref_log_prob(self, batch):
        return super()._compute_ref_log_prob(worker_view(batch))

    def _update_actor(self, batch):
        credit = apply_token_credit(batch) if self.config.genpage.get("credit", "page") == "token" else {}
        view = worker_view(batch)
        actor_output = super()._update_actor(view)
        batch.meta_info.update(view.meta_info)  # what verl's _update_actor sets on the batch it is given
        if self._entity_token is None:
            names = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._entity_token = np.array([is_title_token(n) for n in names])
        metrics = actor_output.meta_info["metrics"]
        metrics.update(step_page_metrics(batch, self._entity_token))
        metrics.update(old_log_prob_pass_metrics(metrics, batch))
        metrics.update(credit)
        self._early_stop(metrics)
        return actor_output


def _set(config, dotted: str, value) -> None:
    from omegaconf import OmegaConf, open_dict

    with open_dict(config):
        OmegaConf.update(config, dotted, value, merge=False)


def _finish_tracking() -> None:
    """verl's legacy fit() leaves its wandb run open; close it, and reset wandb's process-wide settings (read
    from the environment once) so the next seed's fit opens its own run in its own directory."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()


def verl_task_runner_builds_its_own_trainer() -> bool:
    """Canary: verl's `TaskRunner.run` still takes only the config and constructs `RayPPOTrainer` itself, so
    swapping the trainer class still means copying the method."""
    import inspect

    from verl.trainer.main_ppo_v0 import TaskRunner

    run = TaskRunner.__ray_actor_class__.run
    params = [p for p in inspect.signature(run).parameters if not p.startswith("_ray")]  # Ray adds _ray_trace_ctx
    return params == ["self", "config"] and "RayPPOTrainer(" in inspect.getsource(run)


def verl_task_runner_source_sha256() -> str:
    """sha256 of the source of verl's installed `TaskRunner.run`: equal to `COPIED_RUN_SHA256` while the copy below
    still follows it."""
    import hashlib
    import inspect

    from verl.trainer.main_ppo_v0 import TaskRunner

    return hashlib.sha256(inspect.getsource(TaskRunner.__ray_actor_class__.run).encode()).hexdigest()


COPIED_RUN_SHA256 = "95ebfb4a9286d46aef2897e244e0f6ca9bdee241c94b0c5c032960ff4b9bfe82"  # verl 0.9.1's TaskRunner.run

TASK_RUNNER_COPY = UpstreamPin(
    name="rl.trainer.GenPageTaskRunner.run",
    written_against={"verl": VERL},
    retire_when="verl's TaskRunner.run takes the trainer class (or splits its worker and dataset set-up from "
                "building the trainer), so GenPageTaskRunner can call it instead of repeating it",
    canary=verl_task_runner_builds_its_own_trainer,
)


@ray.remote
class GenPageTaskRunner(BaseTaskRunner):
    """verl's TaskRunner (main_ppo_v0.py) building `GenPagePPOTrainer`, and training several seeds in one
    session when `config.genpage.seed_runs` lists them (`rl.config.seed_run`): workers, vLLM server and reward
    workers start once; each seed starts from the pretrained policy (an initial checkpoint saved before any
    training, with a fresh optimizer) or resumes from its own latest checkpoint, with its own data order,
    checkpoint directory, validation dumps, metrics file and wandb run.

    `run` up to `trainer.init_workers()` is a copy of verl 0.9.1's `TaskRunner.run` (its source hash is
    `COPIED_RUN_SHA256`), less its config print-out, its `add_ref_policy_worker` call (a no-op in 0.9.1) and
    its `*_max_samples` (GenPage sets none: -1, all rows). Retire the copy when
    verl's `TaskRunner.run` takes the trainer class (or splits its set-up from building the trainer); the seed
    loop stays. On another verl version `run` warns (`TASK_RUNNER_COPY`)."""

    def run(self, config):
        import os
        from pathlib import Path

        from omegaconf import OmegaConf
        from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler, need_critic, need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config
        from verl.utils.dataset.rl_dataset import collate_fn
        from verl.workers.config import HFModelConfig

        warn_if_versions_differ((TASK_RUNNER_COPY,))
        OmegaConf.resolve(config)
        _, ray_worker_group_cls = self.add_actor_rollout_worker(config)
        self.add_critic_worker(config)
        self.add_reward_model_resource_pool(config)
        self.add_teacher_model_resource_pool(config)
        validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        tokenizer, processor = model_config.tokenizer, model_config.processor
        resource_pool_manager = self.init_resource_pool_mgr(config)
        train_dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer, processor, is_train=True)
        val_dataset = create_rl_dataset(config.data.val_files, config.data, tokenizer, processor, is_train=False)
        trainer = GenPagePPOTrainer(
            config=config, tokenizer=tokenizer, processor=processor, role_worker_mapping=self.role_worker_mapping,
            resource_pool_manager=resource_pool_manager, ray_worker_group_cls=ray_worker_group_cls,
            train_dataset=train_dataset, val_dataset=val_dataset, collate_fn=collate_fn,
            train_sampler=create_rl_sampler(config.data, train_dataset),
        )
        trainer.init_workers()
        runs = OmegaConf.to_container(config.genpage.get("seed_runs") or [])
        if not runs:
            trainer.fit()
            return
        # The workers hold the pretrained policy now: keep it (with a fresh optimizer) for later seeds.
        init_ckpt = Path(config.genpage.init_checkpoint_dir)
        if any(not r["resume"] for r in runs[1:]) and not (init_ckpt / "global_step_0" / "actor").exists():
            _set(config, "trainer.default_local_dir", str(init_ckpt))
            trainer.global_steps = 0
            trainer._save_checkpoint()
            (init_ckpt / "global_step_0" / "data.pt").unlink()  # each seed shuffles the prompts its own way
        for i, run in enumerate(runs):
            for key, value in run["config"].items():
                _set(config, key, value)
            from_init = i > 0 and not run["resume"]
            _set(config, "trainer.resume_mode", "resume_path" if from_init else "auto")
            _set(config, "trainer.resume_from_path", str(init_ckpt / "global_step_0") if from_init else None)
            if i > 0:  # the first seed's dataloader was built with its seed
                trainer._create_dataloader(train_dataset, val_dataset, collate_fn, create_rl_sampler(config.data, train_dataset))
            os.environ.update(run["env"])
            if hasattr(trainer.async_rollout_manager, "set_run_seed"):  # rollout_seeding=request (rl/rollout_seeds.py)
                trainer.async_rollout_manager.set_run_seed(int(config.actor_rollout_ref.rollout.seed))
            print(f"[genpage] seed {run['seed']}: {'resuming' if run['resume'] else 'from the pretrained policy'}")
            trainer.fit()
            _finish_tracking()
