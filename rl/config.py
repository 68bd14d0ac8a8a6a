"""The Dr. GRPO recipe's typed config and its translation into verl's own Hydra config.

`DrGrpoConfig` is what a person edits (recipes/configs/dr_grpo.yaml, `key=value` overrides); everything verl
needs is derived from it in one place (`verl_overrides`), and `compose_verl_config` composes verl's
`ppo_trainer.yaml` with those overrides. Dr. GRPO (arXiv 2503.20783) is configured through verl's options:
`adv_estimator=grpo` with `norm_adv_by_std_in_grpo=False` (no division by the group std, section 3.1) and
`loss_agg_mode=seq-mean-token-sum-norm` with a constant `loss_scale_factor` = the longest page (no division by
the sampled length).
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from common.config import StageConfig, option

KlEstimator = Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]  # verl core_algos.kl_penalty
KL_ESTIMATORS = typing.get_args(KlEstimator)
LOSS_MODE = "genpage_vanilla"  # the on-policy loss rl/policy_loss.py registers with verl under this name
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"  # verl FSDP engine mixed_precision


@dataclass(frozen=True)
class DrGrpoConfig(StageConfig):
    """`python recipes/dr_grpo.py` (recipes/configs/dr_grpo.yaml). Toy defaults for 2 CPU cores."""

    policy_dir: str = option("runs/pretrain/model", "pretrained GenPage HF directory: initializes policy and reference")
    rm_dir: str = option("runs/rm/model", "reward model directory from recipes/train_rm.py (reward_model.scoring)")
    out_dir: str = option("runs/dr_grpo", "run directory: data, checkpoints, wandb, metrics, plots, model, summary")
    seeds: tuple[int, ...] = option((0, 1, 2), "one RL run per seed; the summary reports the mean over seeds")
    steps: int = option(12, "optimizer steps (one rollout batch each); the default keeps `make demo` near 15 minutes on 2 cores (the step and lr sweep: docs/experiments/dr_grpo.md)")
    prompts_per_step: int = option(16, "user contexts per step (verl data.train_batch_size)")
    group_size: int = option(8, "pages sampled per context; Dr. GRPO's advantage baseline is the group mean")
    lr: float = option(4e-4, "actor AdamW learning rate (constant)")
    kl_coef: float = option(0.02, "weight of the KL-to-reference loss (actor.kl_loss_coef)")
    kl_estimator: KlEstimator = option("low_var_kl", "KL estimator of the loss (verl kl_penalty): low_var_kl (k3), kl (k1), mse (k2), abs")
    format_weight: float = option(1.0, "reward = RM score + format_weight * format score (<= 0 per violation)")
    credit: Literal["page", "token"] = option("token", "how a page's reward is credited to its tokens: 'token' = each token its reward-to-go under the reward model's per-token rewards, minus the group mean at its position (rl/advantage.py; needs an entity_feedback or entity_sum reward model; the default because it gains more true reward than page credit at the same budget: docs/wbc.md); 'page' = every token gets the page's advantage (Dr. GRPO as published)")
    reward_source: Literal["rm", "environment"] = option("rm", "what the policy is trained on: 'rm' = the reward model's score (all a real deployment has); 'environment' = the environment's exact expected page reward, a simulator study that isolates the optimizer from the reward model (the RM is still scored and logged; page credit only)")
    rm_ensemble: tuple[str, ...] = option((), "more reward-model directories scored with rm_dir as one ensemble: the policy is trained on the members' mean minus rm_ensemble_k standard deviations, so pages the members disagree on are worth less (Coste et al., 2023; reward_model.scoring.EnsembleScorer); train members with python recipes/train_rm.py seed=<s> out_dir=<dir>")
    rm_ensemble_k: float = option(1.0, "standard deviations subtracted from the ensemble mean (0 = the plain mean)")
    validator_rm_dir: str | None = option(None, "a reward model kept out of training (another seed, other logs), scored on every rollout and logged (rollout/validator_reward, rollout/rm_validator_gap): what a deployment without the truth can watch, and what early stopping reads")
    early_stop_patience: int = option(0, "stop a seed when the validator's score of the rollouts, averaged over early_stop_window steps, has had no new best for this many steps (rl/early_stopping.py); 0 = off; needs validator_rm_dir")
    early_stop_window: int = option(5, "steps in the moving average early stopping reads (each step's rollouts come from other users, so one step is noisy)")
    test_freq: int | None = option(None, "steps between held-out validations (verl trainer.test_freq); None: only before the first and after the last step")
    reward_rules: tuple[str, ...] = option((), "rules scored by the format reward instead of masked (e.g. [dedup]); the rest stay masks")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    max_page_tokens: int | None = option(None, "longest page in tokens, also Dr. GRPO's loss constant (loss_scale_factor); None: the policy checkpoint's page shape (max_rows x (1 + max_row_len) + [EOP]); a number must be at least that")
    max_prompt_tokens: int | None = option(None, "longest prompt in tokens; None: the policy tokenizer's longest (9 + 4 per history action up to max_history + [PAGE]); a number must be at least that")
    mask_logits: bool = option(True, "business-rule masks in vLLM (logits processor) and in the trainer's log-probs")
    old_log_probs: Literal["rollout", "recompute"] = option("rollout", "PPO ratio's old policy: 'rollout' = vLLM's log-probs of the sampled pages (verl's rollout_correction.bypass_mode; same fp32 weights and masks, so no second forward pass; rollout_probs_diff_max then comes from the update's forward, rl/policy_loss.py), 'recompute' = verl's old-log-prob pass")
    ppo_epochs: int = option(1, "passes over each rollout batch")
    mini_batches: int = option(1, "optimizer steps per rollout batch (prompts_per_step must divide by it)")
    grad_clip: float = option(1.0, "max gradient norm")
    save_freq: int = option(10, "steps between verl checkpoints (resume from the latest with resume_mode=auto)")
    eval_users: int = option(500, "held-out (test-split) logged contexts for the final evaluation")
    prompt_seed: int = option(0, "which train-split logged contexts the training prompts are drawn from (rounds of recipes/iterate.py each draw their own)")
    prompt_source: Literal["logged", "environment"] = option("logged", "training prompts: 'logged' (contexts of train-split users in the logs) or 'environment' (fresh contexts the environment samples)")
    eval_temperature: float = option(1.0, "sampling temperature of the evaluation pages (the trained policy samples)")
    reward_timing: Literal["after_rollout", "streamed"] = option("after_rollout", "when the rollout's pages are scored: 'after_rollout' = the whole batch in one reward-model pass when the rollout ends, in the trainer's process (verl's path for a reward model colocated with the rollout, rl/trainer.py; the default: no per-page calls to a reward worker, no small reward-model batches, no batch sent to another process; measurements in docs/benchmarks.md); 'streamed' = each page as it finishes, beside the pages still decoding (verl's default for rewards without a reward-model server); same rewards either way")
    nnodes: int = option(1, "machines of the Ray cluster the run trains on (verl trainer.nnodes); more than one: start Ray on every node and run the recipe on the head (docs/scale.md)")
    ranks_per_node: int = option(1, "data-parallel FSDP ranks per machine (verl trainer.n_gpus_per_node): one per GPU; on CPU, processes that split each step's batch (the global batch, prompts_per_step x group_size, stays the same and must divide by nnodes x ranks_per_node)")
    rollout_tp: int = option(1, "vLLM tensor-parallel size of each rollout replica (rollout.tensor_model_parallel_size): the run serves nnodes x ranks_per_node / rollout_tp replicas")
    micro_batch_pages: int | None = option(None, "pages per forward/backward on each rank (actor update, reference and rollout log-probs); None: the rank's whole mini-batch in one. The logits are [pages, positions, vocabulary], so a large catalog needs a bound here")
    rollout_seeding: Literal["engine", "request"] = option("engine", "how rollouts are seeded: 'engine' = each vLLM replica once (verl's rollout.seed + replica rank), so a step's pages depend on how requests spread over replicas; 'request' = each page its own seed from (seed, step, prompt, copy) (rl/rollout_seeds.py): the same pages on any number of ranks and after a resume")
    num_threads: int = option(2, "torch threads per process; verl's phases (rollout, log-probs, update) mostly take turns, so each may use every core of an idle machine (use 1 on a shared one; timings: docs/experiments/dr_grpo.md)")
    extra_verl_overrides: tuple[str, ...] = option((), "raw Hydra overrides for verl, applied last (they win)")

    def __post_init__(self) -> None:
        problems = []
        if not self.seeds:
            problems.append("seeds must list at least one seed, e.g. seeds=[0]")
        if self.steps < 1 or self.prompts_per_step < 1:
            problems.append("steps and prompts_per_step must be >= 1")
        if self.group_size < 2:
            problems.append("group_size must be >= 2 (a group-relative advantage needs a group)")
        if self.mini_batches < 1 or self.prompts_per_step % self.mini_batches:
            problems.append(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of mini_batches ({self.mini_batches})")
        if self.lr <= 0 or self.kl_coef < 0 or self.format_weight < 0:
            problems.append("lr must be > 0, kl_coef and format_weight >= 0")
        from policies.rules import RULES

        if self.early_stop_patience < 0 or self.early_stop_window < 1 or self.rm_ensemble_k < 0:
            problems.append("early_stop_patience and rm_ensemble_k must be >= 0, early_stop_window >= 1")
        if self.early_stop_patience and not self.validator_rm_dir:
            problems.append("early_stop_patience watches a validator reward model: set validator_rm_dir (e.g. a second "
                            "python recipes/train_rm.py seed=1 out_dir=runs/rm_validator)")
        if self.validator_rm_dir and Path(self.validator_rm_dir).resolve() in {Path(d).resolve() for d in (self.rm_dir, *self.rm_ensemble)}:
            problems.append("validator_rm_dir must be a reward model the policy is not trained on (not rm_dir or in rm_ensemble)")
        if self.test_freq is not None and self.test_freq < 1:
            problems.append("test_freq must be >= 1 (or null)")
        if self.reward_source == "environment" and self.credit == "token":
            problems.append("credit=token needs the reward model's per-token rewards: use it with reward_source=rm, or set "
                            "credit=page to train on the environment")
        if set(self.reward_rules) - set(RULES):
            problems.append(f"reward_rules {sorted(set(self.reward_rules) - set(RULES))} unknown; rules: {', '.join(RULES)}")
        if any(n is not None and n < 2 for n in (self.max_page_tokens, self.max_prompt_tokens)):
            problems.append("max_page_tokens and max_prompt_tokens must be >= 2 (or None: from the policy checkpoint)")
        if self.temperature <= 0:
            problems.append("temperature must be > 0 (rollouts sample)")
        ranks = self.nnodes * self.ranks_per_node
        if min(self.nnodes, self.ranks_per_node, self.rollout_tp) < 1 or ranks % self.rollout_tp:
            problems.append(f"nnodes, ranks_per_node and rollout_tp must be >= 1 and nnodes x ranks_per_node ({ranks}) a "
                            f"multiple of rollout_tp ({self.rollout_tp})")
        elif self.micro_batch_pages is not None and self.micro_batch_pages < 1:
            problems.append("micro_batch_pages must be >= 1 (or null: a rank's whole mini-batch)")
        elif (self.prompts_per_step // self.mini_batches * self.group_size) % ranks:
            problems.append(f"each mini-batch's pages (prompts_per_step / mini_batches x group_size = "
                            f"{self.prompts_per_step // self.mini_batches * self.group_size}) must split evenly over "
                            f"nnodes x ranks_per_node = {ranks} ranks")
        elif self.micro_batch_pages and self._rank_pages(ranks) % min(self._rank_pages(ranks), self.micro_batch_pages):
            per_rank = self._rank_pages(ranks)
            problems.append(f"micro_batch_pages ({self.micro_batch_pages}) must divide each rank's pages of a mini-batch "
                            f"({per_rank}): verl accumulates whole micro-batches")
        if problems:
            raise ValueError("; ".join(problems))

    def _rank_pages(self, ranks: int) -> int:
        """One rank's pages of a mini-batch."""
        return self.prompts_per_step // self.mini_batches * self.group_size // ranks


class SequenceLengths(NamedTuple):
    """verl's and vLLM's sequence budgets, in tokens; `page` is also Dr. GRPO's loss constant."""

    prompt: int  # longest prompt ([PAGE] included): verl data.max_prompt_length
    page: int  # longest page ([EOP] included): data.max_response_length and actor.loss_scale_factor


def sequence_lengths(cfg: DrGrpoConfig, shape, max_prompt_tokens: int) -> SequenceLengths:
    """The budgets from their source, the policy checkpoint: its rules' page shape (`policies.rules.PageShape`)
    and its tokenizer's longest prompt. A configured number may raise a budget, never cut one (verl would cut
    prompts from the left and pages short, and the loss constant must bound every page)."""
    page = shape.max_tokens
    for name, need, have in (("max_page_tokens", page, cfg.max_page_tokens),
                             ("max_prompt_tokens", max_prompt_tokens, cfg.max_prompt_tokens)):
        if have is not None and have < need:
            raise ValueError(f"{name}={have} is less than the policy checkpoint's {need} ({shape} / its tokenizer's "
                             f"longest prompt): leave {name} unset (null) or set it to at least {need}")
    return SequenceLengths(cfg.max_prompt_tokens or max_prompt_tokens, cfg.max_page_tokens or page)


@dataclass(frozen=True)
class RunPaths:
    """Where one seed's run keeps its files (all under cfg.out_dir)."""

    root: Path  # out_dir
    seed: int

    @property
    def data(self) -> Path:
        return self.root / "data"  # prompt parquets (shared by seeds)

    @property
    def run(self) -> Path:
        return self.root / f"seed_{self.seed}"

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"  # verl's global_step_N/ and latest_checkpointed_iteration.txt

    @property
    def metrics(self) -> Path:
        return self.run / "metrics"  # verl's file logger, one JSONL per attempt (resume appends a file)

    @property
    def model(self) -> Path:
        return self.run / "model"  # final HF directory of this seed's RL policy


def final_step(cfg: DrGrpoConfig, paths: RunPaths) -> int:
    """The last step of a seed's run: cfg.steps, or earlier where early stopping decided so (rl/early_stopping.py)."""
    from rl.early_stopping import EarlyStopState

    stopped = EarlyStopState.load(paths.run).stopped_at if cfg.early_stop_patience else None
    return min(cfg.steps, stopped) if stopped is not None else cfg.steps


def on_cpu() -> bool:
    """True when this machine has no CUDA device (the CPU platform and its shims are used)."""
    import torch

    return not torch.cuda.is_available()


def verl_overrides(cfg: DrGrpoConfig, policy_dir: str | Path, paths: RunPaths, seed: int, cpu: bool,
                   lengths: SequenceLengths, validate_before: bool = True) -> list[str]:
    """Hydra overrides of verl's ppo_trainer.yaml for one seed's run.

    policy_dir: the checkpoint policy and reference start from (the pretrained one, rules attached);
    lengths: the prompt and page budgets (`sequence_lengths`);
    validate_before: evaluate it on the held-out prompts before the first step (False when resuming, since the
    resumed policy is no longer the pretrained one, and when another seed of the run has validated it)."""
    abs_ = lambda p: str(Path(p).resolve())  # noqa: E731  (Ray workers do not share the driver's cwd)
    n_rollouts = cfg.prompts_per_step * cfg.group_size
    ranks = cfg.nnodes * cfg.ranks_per_node  # verl's data-parallel size: each rank takes 1/ranks of every batch
    per_rank = cfg._rank_pages(ranks)  # one rank's pages of a mini-batch
    micro = min(per_rank, cfg.micro_batch_pages or per_rank)
    micro_log_prob = min(n_rollouts // ranks, cfg.micro_batch_pages or n_rollouts)
    o = [
        # -- data: logged contexts as chat prompts (the template appends [PAGE]) --------------------------
        f"data.train_files={abs_(paths.data / 'train.parquet')}",
        f"data.val_files={abs_(paths.data / 'valid.parquet')}",
        f"data.train_batch_size={cfg.prompts_per_step}",
        f"data.max_prompt_length={lengths.prompt}",
        f"data.max_response_length={lengths.page}",
        "data.truncation=left",
        "data.filter_overlong_prompts=False",
        "data.dataloader_num_workers=0",
        f"data.seed={seed}",
        # -- model: policy and reference from the pretrained checkpoint, fp32 -----------------------------
        f"actor_rollout_ref.model.path={abs_(policy_dir)}",
        # GenPage's Auto classes; rl.policy_loss registers the on-policy loss with verl (old_log_probs=rollout)
        "actor_rollout_ref.model.external_lib=[policies.modeling_genpage,rl.policy_loss]",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        # Training-time fallback-token replacement would make the trainer's log-probs differ from the sampler's.
        "+actor_rollout_ref.model.override_config.fallback_prob=0.0",
        # verl defaults to flash_attention_2, an optional package (absent on CPU); sdpa is exact and fast enough.
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        f"+actor_rollout_ref.model.override_config.mask_logits={cfg.mask_logits}",
        # -- Dr. GRPO (arXiv 2503.20783) ----------------------------------------------------------------
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=False",
        "algorithm.use_kl_in_reward=False",
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        f"actor_rollout_ref.actor.loss_scale_factor={lengths.page}",
        "actor_rollout_ref.actor.use_kl_loss=True",
        f"actor_rollout_ref.actor.kl_loss_coef={cfg.kl_coef}",
        f"actor_rollout_ref.actor.kl_loss_type={cfg.kl_estimator}",
        "actor_rollout_ref.actor.entropy_coeff=0",
    ]
    if cfg.old_log_probs == "rollout":  # no old-log-prob pass: the sampler/trainer check runs in the update
        o += ["algorithm.rollout_correction.bypass_mode=True",
              f"actor_rollout_ref.actor.policy_loss.loss_mode={LOSS_MODE}"]
    # No entropy in the update: verl adds entropy_coeff (0) x entropy to the loss, so the backward would run through a
    # softmax over every position's vocabulary for nothing. actor/entropy comes from the old-log-prob pass, or without
    # it from the sampler's log-probs (rl.trainer.sampled_entropy).
    o += ["actor_rollout_ref.actor.calculate_entropy=False"]
    o += [
        f"actor_rollout_ref.actor.optim.lr={cfg.lr}",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        f"actor_rollout_ref.actor.grad_clip={cfg.grad_clip}",
        f"actor_rollout_ref.actor.ppo_epochs={cfg.ppo_epochs}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.prompts_per_step // cfg.mini_batches}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.actor.data_loader_seed={seed}",
        f"actor_rollout_ref.actor.fsdp_config.seed={seed}",
        # fp32 end to end: without an explicit mixed_precision verl's FSDP engine computes in bf16 (autocast),
        # and the trainer's log-probs then differ from vLLM's fp32 ones (rollout_probs_diff_max: docs/experiments/dr_grpo.md).
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "actor_rollout_ref.ref.fsdp_config.model_dtype=fp32",
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={FP32}",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={FP32}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro_log_prob}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        # -- rollout: vLLM, fp32, the whole group in one request batch ---------------------------------
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.mode=async",
        f"actor_rollout_ref.rollout.n={cfg.group_size}",
        f"actor_rollout_ref.rollout.temperature={cfg.temperature}",
        "actor_rollout_ref.rollout.dtype=float32",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={cfg.rollout_tp}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro_log_prob}",
        f"actor_rollout_ref.rollout.max_model_len={lengths.prompt + lengths.page + 8}",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={max(4096, lengths.prompt + lengths.page + 8)}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        # -- reward: our manager (RM + format reward; ground truth only logged) --------------------------
        # after the rollout the trainer scores the batch itself (rl/trainer.py): no reward worker to start
        f"reward.num_workers={0 if cfg.reward_timing == 'after_rollout' else 1}",
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.name=GenPageRewardManager",
        "reward.reward_manager.module.path=pkg://rl.reward_manager",
        f"+genpage.data_dir={abs_(cfg.data_dir)}",
        f"+genpage.environment='{cfg.environment}'",
        f"+genpage.rm_dir={abs_(cfg.rm_dir)}",
        f"+genpage.format_weight={cfg.format_weight}",
        f"+genpage.credit={cfg.credit}",  # rl/advantage.py: the reward manager and the trainer read it
        f"+genpage.reward_source={cfg.reward_source}",
        "+genpage.rm_ensemble=[" + ",".join(abs_(d) for d in cfg.rm_ensemble) + "]",
        f"+genpage.rm_ensemble_k={cfg.rm_ensemble_k}",
        f"+genpage.validator_rm_dir={abs_(cfg.validator_rm_dir) if cfg.validator_rm_dir else 'null'}",
        f"+genpage.early_stop_patience={cfg.early_stop_patience}",  # rl/early_stopping.py, read by rl/trainer.py
        f"+genpage.early_stop_window={cfg.early_stop_window}",
        f"+genpage.reward_after_rollout={cfg.reward_timing == 'after_rollout'}",  # read by rl/trainer.py
        # -- trainer ------------------------------------------------------------------------------------
        "trainer.use_v1=False",
        f"trainer.total_training_steps={cfg.steps}",
        "trainer.total_epochs=1000",
        f"trainer.save_freq={cfg.save_freq}",
        "trainer.resume_mode=auto",
        f"trainer.default_local_dir={abs_(paths.checkpoints)}",
        "trainer.max_actor_ckpt_to_keep=null",  # keep all: verl's pruning would reach across seeds of one session
        # Evaluation on held-out users with verl's validation (same vLLM server, same reward manager): the
        # pretrained policy before the first step, the RL policy after the last; per-page records in validation/.
        f"trainer.val_before_train={validate_before}",
        f"trainer.test_freq={cfg.test_freq or cfg.steps}",
        f"trainer.validation_data_dir={abs_(paths.run / 'validation')}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={cfg.eval_temperature}",
        "actor_rollout_ref.rollout.val_kwargs.n=1",
        f"data.val_batch_size={cfg.eval_users}",
        f"trainer.nnodes={cfg.nnodes}",
        f"trainer.n_gpus_per_node={cfg.ranks_per_node}",
        f"trainer.project_name={cfg.wandb_project}",
        f"trainer.experiment_name=dr_grpo_seed{seed}",
        "trainer.logger=[console,wandb,file]" if cfg.wandb_mode != "disabled" else "trainer.logger=[console,file]",
        "+ray_kwargs.ray_init.include_dashboard=False",
    ]
    if cfg.rollout_seeding == "request":  # verl's hook for its agent loop manager class
        o += ["+actor_rollout_ref.rollout.agent.agent_loop_manager_class=rl.rollout_seeds.SeededAgentLoopManager"]
    if cpu:
        o += [
            "trainer.device=cpu",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.ref.strategy=fsdp2",
            "actor_rollout_ref.actor.fsdp_config.strategy=fsdp2",
            "actor_rollout_ref.ref.fsdp_config.strategy=fsdp2",
            "actor_rollout_ref.actor.use_torch_compile=False",
            "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
            "actor_rollout_ref.ref.fsdp_config.use_torch_compile=False",
            "actor_rollout_ref.rollout.enforce_eager=True",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
            "actor_rollout_ref.rollout.free_cache_engine=False",
            "+actor_rollout_ref.rollout.enable_sleep_mode=False",
            f"+ray_kwargs.ray_init.num_gpus={cfg.ranks_per_node}",  # one "GPU" bundle per CPU rank
            # logical CPUs: verl's placement group asks 3 per "GPU" bundle (RayResourcePool's max_colocate_count)
            f"+ray_kwargs.ray_init.num_cpus={max(os.cpu_count() or 2, 4) + 3 * (cfg.ranks_per_node - 1)}",
        ]
    return o + list(cfg.extra_verl_overrides)


def pretrained_validation(out: str | Path, seeds) -> tuple[int, Path] | None:
    """(seed, path) of the held-out validation of the pretrained policy (verl's step-0 dump), else None.

    The pretrained policy is validated once per run, before the first step of the first seed that starts from
    it: every seed starts from the same policy, and its held-out true reward varies little with the sampling
    seed (the true reward is an expectation over each page's outcomes; docs/experiments/dr_grpo.md)."""
    for seed in seeds:
        path = RunPaths(Path(out), seed).run / "validation" / "0.jsonl"
        if path.exists():
            return seed, path
    return None


def seed_run(cfg: DrGrpoConfig, paths: RunPaths, wandb_id: str, attempt: int, validate_pretrained: bool = True) -> dict:
    """What `rl.trainer.GenPageTaskRunner` changes in verl's config and environment to train one seed in a
    session that trains several (one Ray cluster, one set of workers and one vLLM server for all seeds).

    validate_pretrained: validate the pretrained policy before this seed's first step (when no other seed of
    the run has; see `pretrained_validation`). A resumed seed never does: its policy is no longer that one."""
    resume = (paths.checkpoints / "latest_checkpointed_iteration.txt").exists()
    return {
        "seed": paths.seed,
        "resume": resume,  # continue from the seed's own latest checkpoint (else start from the pretrained policy)
        "config": {
            "data.seed": paths.seed,
            "actor_rollout_ref.rollout.seed": paths.seed,  # rl.trainer passes it to the rollout (rollout_seeding=request)
            "actor_rollout_ref.actor.data_loader_seed": paths.seed,
            "trainer.default_local_dir": str(paths.checkpoints.resolve()),
            "trainer.validation_data_dir": str((paths.run / "validation").resolve()),
            "trainer.experiment_name": f"dr_grpo_seed{paths.seed}",
            "trainer.val_before_train": validate_pretrained and not resume,
        },
        "env": {  # read when verl's Tracking starts (per fit)
            "VERL_FILE_LOGGER_PATH": str((paths.metrics / f"attempt_{attempt}.jsonl").resolve()),
            "WANDB_DIR": str(paths.run.resolve()), "WANDB_MODE": cfg.wandb_mode, "WANDB_SILENT": "true",
            "WANDB_RUN_ID": wandb_id, "WANDB_RESUME": "allow",
        },
    }


def compose_verl_config(overrides: list[str]):
    """verl's ppo_trainer.yaml composed with `overrides` (Hydra, in-process) -> OmegaConf DictConfig."""
    import verl.trainer.main_ppo as main_ppo
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = str(Path(main_ppo.__file__).parent / "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@dataclass(frozen=True)
class CompareConfig(StageConfig):
    """`python recipes/compare.py` (recipes/configs/compare.yaml): post-training methods side by side on the same
    held-out users (rl/comparison.py)."""

    methods: tuple[str, ...] = option(
        ("pretrained=runs/pretrain/model", "wbc=runs/wbc/seed_*/model",
         "dr_grpo_page_credit=runs/dr_grpo_page/seed_*/model", "dr_grpo=runs/dr_grpo/seed_*/model"),
        "name=checkpoint_dir per method, a glob for its seeds, or several joined by commas (quote such an item on the command line: \"methods=[pretrained=a/model,'mine=b/model,c/model']\"); gains are over the method named pretrained")
    rm_dir: str = option("runs/rm/model", "reward model that scores every method's pages (the RM reward column)")
    out_dir: str = option("runs/compare", "summary.json and results.md")
    format_weight: float = option(1.0, "weight of the format score in the judged reward (as in Dr. GRPO's)")
    eval_users: int = option(500, "held-out (test-split) logged contexts every checkpoint writes pages for")
    contexts_seed: int = option(1, "which held-out contexts: 1 draws Dr. GRPO's evaluation contexts (rl/evaluation.py)")
    eval_sequences: int = option(1000, "held-out (valid-split) logged pages of Table 1")
    eval_backend: Literal["vllm", "hf"] = option("vllm", "what generates the pages: vllm (the serving engine) or hf")
    max_new_tokens: int = option(64, "longest generated page")
    seed: int = option(0, "sampling seed of the sampled pages")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method, e.g. methods=[pretrained=runs/pretrain/model]")
        if self.eval_users < 1 or self.eval_sequences < 1:
            raise ValueError("eval_users and eval_sequences must be >= 1")


@dataclass(frozen=True)
class IterateConfig(StageConfig):
    """`python recipes/iterate.py` (recipes/configs/iterate.yaml): iterated rounds of serving, logging, reward-model
    training and Dr. GRPO (rl/iteration.py)."""

    rounds: int = option(3, "rounds of RL in all; round 1 is first_round_dir's run, each later one serves, logs, retrains the reward model and runs Dr. GRPO again")
    seeds: tuple[int, ...] = option((0, 1, 2), "one chain per seed, each on its own from round 1's policy of that seed: its served pages, logs, reward models and RL runs")
    first_round_dir: str = option("runs/dr_grpo", "round 1: a Dr. GRPO run of `seeds` on data_dir's logs (the demo's); trained by python recipes/dr_grpo.py when it holds no summary.json")
    pretrained_dir: str = option("runs/pretrain/model", "pretrained GenPage directory: round 1's policy and every round's reward-model initialization")
    rm_dir: str = option("runs/rm/model", "round 1's reward model (from python recipes/train_rm.py)")
    out_dir: str = option("runs/iterate", "round_<r>/seed_<s>/ (logs, data, rm, dr_grpo), summary.json, results.md, rounds.png")
    refresh_rm: bool = option(True, "serve, log and retrain the reward model each round; false is the control: the same rounds of RL from the previous policy on round 1's reward model and logs")
    impressions_per_round: int = option(4000, "requests of train-split users each chain's policy serves per round (the toy world's logs hold 24,000)")
    temperature: float = option(1.0, "sampling temperature of the served pages (the policy as RL trained it)")
    explore_fraction: float = option(0.15, "share of requests served at explore_temperature, as the logging policy explores a share of its requests (homepage/logging_policy.py)")
    explore_temperature: float = option(2.0, "sampling temperature of the exploratory requests: wider coverage for the next reward model")
    max_new_tokens: int = option(64, "longest served page in tokens")
    rm_args: tuple[str, ...] = option(("scratch_ablation=false", "generated_users=0"), "extra key=value overrides of every round's python recipes/train_rm.py (the ablation and the generated-page evaluation are off by default: they do not change the model)")
    dr_grpo_args: tuple[str, ...] = option((), "extra key=value overrides of every round's python recipes/dr_grpo.py (round 1's too, when it is trained here)")

    def __post_init__(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        if not self.seeds:
            problems.append("seeds must list at least one seed, e.g. seeds=[0]")
        if self.impressions_per_round < 1:
            problems.append("impressions_per_round must be >= 1")
        if not 0.0 <= self.explore_fraction <= 1.0:
            problems.append(f"explore_fraction must be in [0, 1], got {self.explore_fraction}")
        if self.temperature <= 0 or self.explore_temperature <= 0:
            problems.append("temperature and explore_temperature must be > 0 (served pages are sampled)")
        for arg in (*self.rm_args, *self.dr_grpo_args):
            if "=" not in arg:
                problems.append(f"rm_args / dr_grpo_args take key=value overrides, got {arg!r}")
            elif arg.split("=", 1)[0].lstrip("+") in ("data_dir", "out_dir", "policy_dir", "rm_dir", "pretrained_dir", "seeds", "seed", "prompt_seed"):
                problems.append(f"{arg!r}: iterate sets {arg.split('=', 1)[0]} itself for each round")
        if problems:
            raise ValueError("; ".join(problems))
