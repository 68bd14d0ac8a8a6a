"""The recipe's typed config: the shipped YAML loads, bad values fail with a fix, verl gets what we mean; the
CPU platform and the pure parts of its shims."""

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from policies.rules import PageShape
from rl.config import (DrGrpoConfig, RunPaths, SequenceLengths, pretrained_validation, seed_run, sequence_lengths,
                       verl_overrides)

ROOT = Path(__file__).parents[2]


def test_shipped_yaml_loads():
    cfg = load_config(DrGrpoConfig, ROOT / "recipes/configs/dr_grpo.yaml")
    assert cfg.group_size >= 2 and len(cfg.seeds) == 3 and cfg.mask_logits
    assert (ROOT / "recipes/configs/dr_grpo.yaml").read_text().startswith("# ")


@pytest.mark.parametrize("override, hint", [
    ("group_size=1", "group_size"), ("kl_estimator=k9", "low_var_kl"), ("reward_rules=[nope]", "dedup"),
    ("mini_batches=3", "multiple"), ("seeds=[]", r"seeds=\[0\]"), ("old_log_probs=vllm", "recompute"),
    ("credit=title", "token"), ("reward_source=truth", "environment"),
])
def test_bad_values_say_how_to_fix(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config(DrGrpoConfig, None, [override])


def test_token_credit_needs_the_reward_models_per_token_rewards():
    with pytest.raises(ConfigError, match="use it with reward_source=rm"):
        load_config(DrGrpoConfig, None, ["credit=token", "reward_source=environment"])
    cfg = DrGrpoConfig(credit="token")
    o = verl_overrides(cfg, "m", RunPaths(Path("/tmp/x"), 0), seed=0, cpu=True, lengths=SequenceLengths(90, 55))
    assert "+genpage.credit=token" in o and "+genpage.reward_source=rm" in o


def test_shipped_long_config_stops_early_on_a_validator_and_composes(tmp_path):
    cfg = load_config(DrGrpoConfig, ROOT / "recipes/configs/dr_grpo_long.yaml")
    assert cfg.credit == "token" and cfg.early_stop_patience > 0 and cfg.validator_rm_dir and cfg.rm_ensemble
    assert cfg.steps > DrGrpoConfig().steps and cfg.steps % cfg.test_freq == 0
    cfg = DrGrpoConfig(rm_ensemble=("a/model", "b/model"), validator_rm_dir="v/model", early_stop_patience=4, test_freq=3)
    o = verl_overrides(cfg, "m", RunPaths(tmp_path, 0), seed=0, cpu=True, lengths=SequenceLengths(90, 55))
    assert f"+genpage.rm_ensemble=[{Path('a/model').resolve()},{Path('b/model').resolve()}]" in o
    assert f"+genpage.validator_rm_dir={Path('v/model').resolve()}" in o and "trainer.test_freq=3" in o
    assert "+genpage.early_stop_patience=4" in o
    from rl.config import compose_verl_config

    composed = compose_verl_config(o)  # Hydra parses the list and the null
    assert list(composed.genpage.rm_ensemble) == [str(Path("a/model").resolve()), str(Path("b/model").resolve())]
    plain = compose_verl_config(verl_overrides(DrGrpoConfig(), "m", RunPaths(tmp_path, 0), seed=0, cpu=True,
                                               lengths=SequenceLengths(90, 55)))
    assert list(plain.genpage.rm_ensemble) == [] and plain.genpage.validator_rm_dir is None


def test_overrides_cpu_only_settings_and_masks(tmp_path):
    cfg = DrGrpoConfig(mask_logits=True, kl_coef=0.05, group_size=4)
    paths = RunPaths(tmp_path, seed=1)
    lengths = SequenceLengths(prompt=90, page=55)
    gpu = verl_overrides(cfg, "m", paths, seed=1, cpu=False, lengths=lengths)
    cpu = verl_overrides(cfg, "m", paths, seed=1, cpu=True, lengths=lengths)
    assert "+actor_rollout_ref.model.override_config.mask_logits=True" in gpu
    assert "actor_rollout_ref.actor.kl_loss_coef=0.05" in gpu and "actor_rollout_ref.rollout.n=4" in gpu
    assert not any("fsdp2" in o or "ray_init.num_gpus" in o or "sleep_mode" in o for o in gpu)  # GPU: verl's defaults
    assert "actor_rollout_ref.actor.strategy=fsdp2" in cpu and "+ray_kwargs.ray_init.num_gpus=1" in cpu
    assert f"trainer.default_local_dir={(tmp_path / 'seed_1' / 'checkpoints').resolve()}" in gpu
    assert "trainer.resume_mode=auto" in gpu
    assert "data.max_prompt_length=90" in gpu and "actor_rollout_ref.actor.loss_scale_factor=55" in gpu
    assert "actor_rollout_ref.rollout.max_model_len=153" in gpu  # 90 + 55 + 8 spare


def test_sequence_lengths_come_from_the_checkpoint_and_may_only_grow():
    """6 rows x (1 row token + 8 titles) + [EOP] = 55; the prompt budget is the tokenizer's longest prompt."""
    shape = PageShape(min_rows=3, max_rows=6, min_row_len=3, max_row_len=8)
    assert sequence_lengths(DrGrpoConfig(), shape, 90) == SequenceLengths(prompt=90, page=55)
    assert sequence_lengths(DrGrpoConfig(max_page_tokens=64, max_prompt_tokens=100), shape, 90) == (100, 64)
    with pytest.raises(ValueError, match="max_page_tokens=54 is less than .* 55"):
        sequence_lengths(DrGrpoConfig(max_page_tokens=54), shape, 90)
    with pytest.raises(ValueError, match="max_prompt_tokens=80 .* at least 90"):
        sequence_lengths(DrGrpoConfig(max_prompt_tokens=80), shape, 90)


def test_pretrained_policy_validated_once_per_run(tmp_path):
    """Only the seed asked to validates the pretrained policy, never a resumed one; the run's pretrained
    validation is the first seed's step-0 dump that exists."""
    cfg = DrGrpoConfig(seeds=(0, 1, 2))
    assert pretrained_validation(tmp_path, cfg.seeds) is None
    fresh = seed_run(cfg, RunPaths(tmp_path, 1), "id", 0, validate_pretrained=True)
    assert fresh["config"]["trainer.val_before_train"] is True and fresh["resume"] is False
    assert seed_run(cfg, RunPaths(tmp_path, 2), "id", 0, validate_pretrained=False)["config"]["trainer.val_before_train"] is False
    resumed = RunPaths(tmp_path, 0)
    resumed.checkpoints.mkdir(parents=True)
    (resumed.checkpoints / "latest_checkpointed_iteration.txt").write_text("10")
    run = seed_run(cfg, resumed, "id", 1, validate_pretrained=True)
    assert run["resume"] is True and run["config"]["trainer.val_before_train"] is False
    dump = RunPaths(tmp_path, 1).run / "validation" / "0.jsonl"
    dump.parent.mkdir(parents=True)
    dump.write_text("{}")
    assert pretrained_validation(tmp_path, cfg.seeds) == (1, dump)
    assert pretrained_validation(tmp_path, (2,)) is None


def test_cpu_platform_and_shim_helpers():
    pytest.importorskip("verl")
    from rl.cpu_platform import PlatformCPU, cpu_env
    from rl.cpu_shims import dedupe_backend

    p = PlatformCPU()
    assert (p.device_name, p.communication_backend_name(), p.current_device(), p.is_ipc_supported()) == ("cpu", "gloo", "cpu", False)
    assert p.device_module.current_device() == "cpu" and p.device_module.memory_allocated() == 0
    assert cpu_env()["VERL_USE_EXTERNAL_MODULES"] == "rl.cpu_platform"
    assert dedupe_backend("cpu:gloo,cpu:gloo") == "cpu:gloo"
    assert dedupe_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert dedupe_backend(None) is None


def test_vectorized_logprobs_equal_verls_fallback_and_patch_the_engine():
    """The shim's one-op log-probs match verl's row-loop fallback in value and gradient (fp32), and after
    apply_all the FSDP engine module calls the shim (its own import of the name); bf16 keeps verl's path."""
    pytest.importorskip("verl")
    import torch
    from verl.utils.torch_functional import logprobs_from_logits_v2

    from rl import cpu_shims

    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 4).requires_grad_(True)  # [B, T, V]
    labels = torch.randint(0, 11, (3, 7))
    ours = cpu_shims.vectorized_label_logprobs(logits, labels)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(7.0)).sum(), logits)
    theirs = logprobs_from_logits_v2(logits, labels)
    (g_theirs,) = torch.autograd.grad((theirs * torch.arange(7.0)).sum(), logits)
    assert ours.shape == (3, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1, 2], torch.log_softmax(logits[1, 2], -1)[labels[1, 2]])  # by hand

    cpu_shims.apply_all()
    import verl.workers.engine.fsdp.transformer_impl as engine

    assert getattr(engine.logprobs_from_logits, "_genpage_vectorized", False)
    flat = logits.detach().reshape(-1, 11)  # the engine's packed [tokens, V] layout
    torch.testing.assert_close(engine.logprobs_from_logits(flat, labels.reshape(-1)),
                               logprobs_from_logits_v2(flat, labels.reshape(-1)), rtol=0, atol=1e-5)
    bf16 = flat.to(torch.bfloat16)  # other dtypes keep verl's path
    torch.testing.assert_close(engine.logprobs_from_logits(bf16, labels.reshape(-1)),
                               logprobs_from_logits_v2(bf16, labels.reshape(-1)))


def test_data_parallel_ranks_split_the_same_global_batch_and_compose(tmp_path):
    """ranks_per_node / nnodes / rollout_tp reach verl's own keys; the global batch stays prompts x group, so each
    rank's micro-batch is its share of it, and a split that does not come out even is refused up front."""
    from rl.config import compose_verl_config

    lengths = SequenceLengths(90, 55)
    one = verl_overrides(DrGrpoConfig(prompts_per_step=8, group_size=4), "m", RunPaths(tmp_path, 0), seed=0, cpu=True,
                         lengths=lengths)
    cfg = DrGrpoConfig(prompts_per_step=8, group_size=4, ranks_per_node=2)
    two = verl_overrides(cfg, "m", RunPaths(tmp_path, 0), seed=0, cpu=True, lengths=lengths)
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32" in one
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16" in two
    assert "trainer.n_gpus_per_node=2" in two and "+ray_kwargs.ray_init.num_gpus=2" in two
    bounded = verl_overrides(DrGrpoConfig(prompts_per_step=8, group_size=4, ranks_per_node=2, micro_batch_pages=4), "m",
                             RunPaths(tmp_path, 0), seed=0, cpu=True, lengths=lengths)
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4" in bounded
    assert "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4" in bounded
    assert "data.train_batch_size=8" in one and "data.train_batch_size=8" in two  # the global batch
    composed = compose_verl_config(verl_overrides(DrGrpoConfig(prompts_per_step=64, nnodes=4, ranks_per_node=8,
                                                               rollout_tp=2), "m", RunPaths(tmp_path, 0), seed=0,
                                                  cpu=False, lengths=lengths))
    assert (composed.trainer.nnodes, composed.trainer.n_gpus_per_node) == (4, 8)
    assert composed.actor_rollout_ref.rollout.tensor_model_parallel_size == 2
    assert composed.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 64 * 8 // 32
    with pytest.raises(ConfigError, match="split evenly over nnodes x ranks_per_node = 3"):
        load_config(DrGrpoConfig, None, ["prompts_per_step=4", "group_size=4", "ranks_per_node=3"])
    with pytest.raises(ConfigError, match="must divide each rank's pages of a mini-batch"):
        load_config(DrGrpoConfig, None, ["prompts_per_step=4", "group_size=4", "ranks_per_node=2", "micro_batch_pages=3"])
    with pytest.raises(ConfigError, match="multiple of rollout_tp"):
        load_config(DrGrpoConfig, None, ["ranks_per_node=2", "rollout_tp=4"])


def test_request_seeding_installs_the_seeded_agent_loop_manager(tmp_path):
    from rl.config import compose_verl_config

    o = verl_overrides(DrGrpoConfig(rollout_seeding="request"), "m", RunPaths(tmp_path, 0), seed=0, cpu=True,
                       lengths=SequenceLengths(90, 55))
    manager = compose_verl_config(o).actor_rollout_ref.rollout.agent.agent_loop_manager_class
    from verl.utils.import_utils import load_class_from_fqn

    from rl.rollout_seeds import SeededAgentLoopManager

    assert load_class_from_fqn(manager, "AgentLoopManager") is SeededAgentLoopManager
    plain = verl_overrides(DrGrpoConfig(), "m", RunPaths(tmp_path, 0), seed=0, cpu=True, lengths=SequenceLengths(90, 55))
    assert not any("agent_loop_manager_class" in x for x in plain)
    assert seed_run(DrGrpoConfig(), RunPaths(tmp_path, 3), "id", 0)["config"]["actor_rollout_ref.rollout.seed"] == 3
