"""Stage 4: Dr. GRPO on verl with vLLM rollouts, business-rule masks, format rewards and a KL penalty.

    python recipes/dr_grpo.py [--config recipes/configs/dr_grpo.yaml] [--force] [key=value ...]

Runs verl's own PPO trainer (Ray single controller, FSDP actor and reference, vLLM rollouts) for each seed in
turn, in one session (workers and vLLM start once), policy and reference initialized from the pretrained
checkpoint (with the dataset's business rules attached). Prompts are logged contexts of the dataset directory's
train-split users; held-out (test-split) logged contexts are the evaluation set.
On a machine without a GPU, verl gets a CPU platform through its plugin registry (rl/cpu_platform.py) and the
documented shims of rl/cpu_shims.py. Resumes each seed from its last verl checkpoint when interrupted.

Writes out_dir/: data/ (prompt parquets), seed_<s>/ (checkpoints/, metrics/, validation/, model/), model/
(the first seed's RL policy, HF directory), results.md, curves.png, summary.json and wandb runs (offline).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import to_dict
from common.processes import release_freed_memory
from rl.config import (DrGrpoConfig, RunPaths, SequenceLengths, compose_verl_config, final_step, on_cpu,
                       pretrained_validation, seed_run, sequence_lengths, verl_overrides)
from rl.runtime import RunGuard, init_ray


def prepare_policy(cfg: DrGrpoConfig, out: Path) -> Path:
    """A copy of the pretrained checkpoint whose config carries the business rules (the checkpoint's own, else
    the dataset's), with `cfg.reward_rules` switched from mask to format reward. Every verl and vLLM process
    then has the same rules; vLLM's rule logits processor switches on from them."""
    from policies.rules import RuleSet, attach_rules, dataset_ruleset
    from policies.tokenizer import GenPageTokenizer

    init = out / "init_model"
    if (init / "config.json").exists():
        return init
    tmp = out / ".init_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.policy_dir, tmp)
    if json.loads((tmp / "config.json").read_text()).get("business_rules"):
        rules = RuleSet.from_pretrained(tmp)  # a checkpoint whose rules do not load is an error, not a fallback
    else:
        rules = dataset_ruleset(cfg.data_dir, tok=GenPageTokenizer.from_pretrained(tmp))
    attach_rules(tmp, rules.with_modes(**{rule: "reward" for rule in cfg.reward_rules}))
    tmp.rename(init)
    return init


def policy_lengths(cfg: DrGrpoConfig, init: Path) -> SequenceLengths:
    """The prompt and page budgets from the policy checkpoint (its page shape and tokenizer), checked against
    any configured in cfg."""
    from policies.rules import RuleSet
    from policies.tokenizer import GenPageTokenizer

    shape = RuleSet.from_pretrained(init).config.shape
    try:
        return sequence_lengths(cfg, shape, GenPageTokenizer.from_pretrained(init).max_prompt_tokens)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def write_prompts(cfg: DrGrpoConfig, out: Path, init: Path, lengths: SequenceLengths) -> None:
    """Training prompts: logged contexts of train-split users (drawn with replacement, enough for every step);
    held-out: test-split logged contexts, with their logged page (the logging policy's row of the table)."""
    import numpy as np
    import pyarrow.compute as pc

    from homepage.dataset import open_stage_dataset
    from homepage.logs import iter_impressions, other_page_of_user, rows_where, sample_impressions
    from policies.tokenizer import GenPageTokenizer, check_tokenizer_matches
    from rl.data import prompt_rows, write_prompt_parquet

    data = out / "data"
    if (data / "train.parquet").exists() and (data / "valid.parquet").exists():
        return
    dataset, table, report = open_stage_dataset(cfg, out)
    print(f"[data] {report.summary()}")
    tok = GenPageTokenizer.from_pretrained(init)
    check_tokenizer_matches(tok, dataset, table, f"the policy {cfg.policy_dir}")
    n_train = cfg.steps * cfg.prompts_per_step
    if cfg.prompt_source == "environment":  # fresh requests of train-split users, from an environment that samples
        from homepage.environment import load_environment, sample_contexts
        from homepage.logs import Impression
        from homepage.pages import Page

        contexts = sample_contexts(load_environment(cfg.environment, dataset), n_train, "train", seed=cfg.prompt_seed)
        if contexts is None:
            raise SystemExit("prompt_source=environment needs an environment that samples contexts (environment=...)")
        train_imps = [Impression(i, "train", c, Page(()), (), (), (), (), 0.0) for i, c in enumerate(contexts)]
    else:  # logged contexts of train-split users, drawn with replacement
        train_idx = rows_where(pc.equal(table.column("split"), "train"))
        if not len(train_idx):
            raise SystemExit(f"{dataset.logs}: no train-split impressions to take prompts from")
        train_imps = list(iter_impressions(table.take(np.random.default_rng([cfg.prompt_seed, 7]).choice(train_idx, size=n_train))))
    train = prompt_rows(tok, train_imps, "train")
    test_imps = sample_impressions(table, "test", cfg.eval_users, seed=1)
    heldout = prompt_rows(tok, test_imps, "test")
    for row, imp, other in zip(heldout, test_imps, other_page_of_user(test_imps, table)):
        row["extra_info"]["logged_page"] = tok.encode_page(imp.page)
        row["extra_info"]["other_page"] = tok.encode_page(other) if other is not None else []
    longest = max(len(r["prompt"][0]["content"].split()) + 1 for r in train + heldout)  # + [PAGE]
    if longest > lengths.prompt:  # verl would cut prompts from the left: [BOS], profile and request first
        raise SystemExit(f"a prompt has {longest} tokens, more than the budget of {lengths.prompt}: set "
                         f"max_prompt_tokens={longest}")
    write_prompt_parquet(data / "valid.parquet", heldout)
    write_prompt_parquet(data / "train.parquet", train)
    (data / "bad_rows.json").write_text(json.dumps(report.bad_rows()))  # for summary.json, across resumes


def run_seeds(cfg: DrGrpoConfig, init: Path, lengths: SequenceLengths, seeds: list[int], guard: RunGuard) -> None:
    """One verl session training `seeds` in turn (each resumed from its latest checkpoint if it has one),
    then each seed's final HF weights as seed_<s>/model."""
    import ray
    from omegaconf import open_dict
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from rl.trainer import GenPageTaskRunner

    out = Path(cfg.out_dir)
    runs = []
    validate_pretrained = pretrained_validation(out, cfg.seeds) is None  # once per run, by the first fresh seed
    for seed in seeds:
        paths = RunPaths(out, seed)
        paths.metrics.mkdir(parents=True, exist_ok=True)
        wandb_id = paths.run / "wandb_id.txt"
        if not wandb_id.exists():  # one wandb run per seed, continued on resume
            wandb_id.write_text(uuid.uuid4().hex[:12])
        runs.append(seed_run(cfg, paths, wandb_id.read_text().strip(), attempt=len(list(paths.metrics.glob("attempt_*.jsonl"))),
                             validate_pretrained=validate_pretrained))
        validate_pretrained &= not runs[-1]["config"]["trainer.val_before_train"]
    env = {
        "OMP_NUM_THREADS": str(cfg.num_threads), "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true",
        # Ray kills workers when the *host* passes 95% memory use, counting other users' processes on a shared
        # machine; leave out-of-memory decisions to the kernel unless the host is really full.
        "RAY_memory_usage_threshold": os.environ.get("RAY_memory_usage_threshold", "0.99"),
    }
    if on_cpu():
        from rl.cpu_platform import cpu_env

        env.update(cpu_env())
    os.environ.update(env)
    first = RunPaths(out, seeds[0])
    overrides = verl_overrides(cfg, init, first, seeds[0], on_cpu(), lengths,
                               validate_before=runs[0]["config"]["trainer.val_before_train"])
    overrides += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}='{v}'" for k, v in env.items()]
    config = compose_verl_config(overrides)
    with open_dict(config):
        config.genpage.seed_runs = runs
        config.genpage.init_checkpoint_dir = str((out / "init_checkpoint").resolve())
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    print(f"[dr_grpo] seeds {seeds}: one verl session -> {out}/seed_<s>")
    try:
        init_ray(config)
        guard.install_signal_handlers()  # after ray.init, whose own SIGTERM handler aborts the driver
        run_ppo(config, task_runner_class=GenPageTaskRunner)
    finally:
        ray.shutdown()
    for seed in seeds:
        export_model(RunPaths(out, seed), init)


def export_model(paths: RunPaths, init: Path) -> None:
    """verl's last checkpoint saved HF weights (save_contents hf_model): copy them with the tokenizer."""
    step = int((paths.checkpoints / "latest_checkpointed_iteration.txt").read_text())
    hf = paths.checkpoints / f"global_step_{step}" / "actor" / "huggingface"
    tmp = paths.run / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf, tmp)
    for f in init.iterdir():  # tokenizer files, the rules' tables (anything the HF export lacks but the weights)
        if not (tmp / f.name).exists() and f.is_file() and not f.name.startswith(("model.", "model-")):
            shutil.copy2(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = "float32"  # verl writes the config of its bf16 template; the weights are fp32
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(paths.model, ignore_errors=True)
    tmp.rename(paths.model)


def main() -> None:
    cfg, args = parse_recipe_args(DrGrpoConfig, "recipes/configs/dr_grpo.yaml", __doc__.splitlines()[1])
    for field, need, how in (("data_dir", Path(cfg.data_dir) / "dataset.yaml", "python recipes/make_world.py"),
                             ("policy_dir", Path(cfg.policy_dir) / "config.json", "python recipes/pretrain.py"),
                             ("rm_dir", Path(cfg.rm_dir) / "config.json", "python recipes/train_rm.py"),
                             *((f"rm_ensemble[{i}]", Path(d) / "config.json", "python recipes/train_rm.py seed=<s> out_dir=<dir>")
                               for i, d in enumerate(cfg.rm_ensemble)),
                             *((("validator_rm_dir", Path(cfg.validator_rm_dir) / "config.json",
                                 "python recipes/train_rm.py seed=1 out_dir=<dir>"),) if cfg.validator_rm_dir else ())):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run `{how}` first, or point {field}=... at an existing directory")
    if cfg.credit == "token":  # checked here, not at the first step in a Ray reward worker
        from policies.reward_heads import get_reward_readout

        for rm_dir in (cfg.rm_dir, *cfg.rm_ensemble):
            head = json.loads((Path(rm_dir) / "config.json").read_text()).get("reward_head", "entity_sum")
            if not get_reward_readout(head).per_token:
                raise SystemExit(f"credit=token needs per-token rewards, but the reward model {rm_dir} reads its score "
                                 f"with the {head!r} head: train it with reward_head=entity_feedback (or entity_sum), "
                                 "or use credit=page")
    if cfg.reward_source == "environment":  # checked here, not first in a Ray reward worker
        from homepage.dataset import load_dataset
        from homepage.environment import load_environment

        if load_environment(cfg.environment, load_dataset(cfg.data_dir)) is None:
            raise SystemExit(f"reward_source=environment trains on the true reward, but {cfg.data_dir} has no environment "
                             "(environment=auto finds none): give one as environment=module:Class")
    out = Path(cfg.out_dir)
    if reuse_or_start(out, args.force, "dr_grpo", "summary.json"):
        return
    t0 = time.perf_counter()
    with RunGuard() as guard:
        init = prepare_policy(cfg, out)
        lengths = policy_lengths(cfg, init)
        write_prompts(cfg, out, init, lengths)
        release_freed_memory()  # the validated log table is gone: give its pages back before verl's processes start
        pending = []
        for seed in cfg.seeds:
            paths = RunPaths(out, seed)
            if (paths.model / "config.json").exists():
                continue
            if (paths.run / "validation" / f"{final_step(cfg, paths)}.jsonl").exists():  # trained and evaluated: export only
                export_model(paths, init)
            else:
                pending.append(seed)
        if pending:
            run_seeds(cfg, init, lengths, pending, guard)
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(RunPaths(out, cfg.seeds[0]).model, out / "model")  # the RL policy (first seed)
    from rl.evaluation import evaluate_run

    summary = evaluate_run(cfg, out, init)
    summary["wall_s"] = time.perf_counter() - t0
    summary["config"] = to_dict(cfg)
    summary["sequence_lengths"] = lengths._asdict()
    summary["ranks"] = cfg.nnodes * cfg.ranks_per_node  # verl's data-parallel size (FSDP ranks)
    bad_rows = out / "data" / "bad_rows.json"
    summary["bad_rows"] = json.loads(bad_rows.read_text()) if bad_rows.exists() else None
    write_summary(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
