"""Stage 3: train the page-level reward model on impression logs (paper section 5.3).

    python recipes/train_rm.py [--config recipes/configs/train_rm.yaml] [--force] [key=value ...]

Initialized from the pretrained GenPage checkpoint (recipes/pretrain.py), the reward model scores a page as
the sum of per-title rewards (the `entity_feedback` head: each title's expected reward under the dataset's
reward system) and regresses the page reward of every logged impression of the train users of a dataset
directory; validation users are held out. Where an environment is configured (the toy world declares its
simulator) it is also judged on the ground truth, on logged pages and on pages the pretrained policy generates
for held-out logged contexts, against the same training from a random backbone and two baselines. Resumes from out_dir/checkpoints when
interrupted. Writes out_dir/model (HF directory with tokenizer; load it with
reward_model.scoring.PageRewardScorer), summary.json, results.md, pred_vs_observed.png and wandb runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from common import distributed
from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.processes import release_freed_memory
from homepage.dataset import DatasetError, open_stage_dataset
from homepage.environment import load_environment
from homepage.logs import LogSchemaError, sample_impressions
from policies.evaluation import pages_from_tokens
from policies.tokenizer import GenPageTokenizer, check_tokenizer_matches
from reward_model.config import RewardModelConfig
from policies.data import encode_stage_logs, split_logs
from reward_model.data import ENTITY_TARGET_COLUMNS, RewardNormalization, check_disjoint_users, entity_targets
from reward_model.evaluation import (BagOfEntitiesRidge, EvalSet, evaluate, logged_eval_set, results_table,
                                     scatter_plot)
from reward_model.heads import get_reward_head
from reward_model.pipeline import InitRun, train_inits


def check_inputs(cfg: RewardModelConfig) -> Path:
    """The pretrained dir; a missing input names the command that makes it."""
    if not (Path(cfg.data_dir) / "dataset.yaml").exists():
        raise SystemExit(f"{Path(cfg.data_dir) / 'dataset.yaml'} is missing: point data_dir=... at a dataset directory "
                         "(docs/dataset.md), or create the toy one with `python recipes/make_world.py`")
    pretrained = Path(cfg.pretrained_dir)
    if not (pretrained / "config.json").exists() or not (pretrained / "genpage_tokenizer.json").exists():
        raise SystemExit(f"{pretrained} holds no pretrained GenPage model with its tokenizer: run "
                         "`python recipes/pretrain.py` first (or set pretrained_dir=...)")
    return pretrained


def generated_pages(cfg: RewardModelConfig, env, table, tok: GenPageTokenizer, cache: Path) -> dict:
    """Two pages per context that the pretrained policy samples for held-out (valid-split) logged contexts, with
    their true expected reward: off the logging distribution, where RL will push. Cached in `cache` (resume)."""
    if cache.exists():
        return json.loads(cache.read_text())
    contexts = [imp.context for imp in sample_impressions(table, "valid", cfg.generated_users, cfg.seed)]
    prompts = [tok.encode_context(c) for c in contexts]
    if cfg.eval_backend == "vllm":
        from policies import vllm_engine

        llm = vllm_engine.make_llm(cfg.pretrained_dir, seed=cfg.seed)
        pages = [s["token_ids"] for samples in vllm_engine.generate(llm, prompts, 1.0, cfg.max_new_tokens, tok.eop_id, n=2)
                 for s in samples]
        del llm
        torch.set_num_threads(cfg.num_threads)
    else:
        from transformers import AutoModelForCausalLM

        from policies.hf_generation import generate_pages_hf

        policy = AutoModelForCausalLM.from_pretrained(cfg.pretrained_dir, dtype=torch.float32)
        torch.manual_seed(cfg.seed)
        pages = generate_pages_hf(policy, tok, [p for p in prompts for _ in range(2)], 1.0, cfg.max_new_tokens)
    pair = np.repeat(np.arange(len(contexts)), 2)  # page 2g and 2g + 1 share context g
    structured, report = pages_from_tokens(tok, pages)
    true = env.true_page_reward([contexts[g] for g in pair], structured)
    out = {"prompts": [prompts[g] for g in pair], "pages": pages, "true": true.tolist(),
           "decode_report": dataclasses.asdict(report)}
    tmp = cache.with_name(f".{cache.name}.tmp")  # renamed once whole: a kill never leaves half a cache
    tmp.write_text(json.dumps(out))
    tmp.replace(cache)
    return out


def main() -> None:
    cfg, args = parse_recipe_args(RewardModelConfig, "recipes/configs/train_rm.yaml", __doc__.splitlines()[1])
    torch.set_num_threads(cfg.num_threads)
    pretrained = check_inputs(cfg)
    out = Path(cfg.out_dir)
    ranks = distributed.init_ranks()  # under torchrun: this rank of the data-parallel group (common/distributed.py)
    ranks.check_batch(cfg.batch_size)
    reuse = ranks.is_main and reuse_or_start(out, args.force, "train_rm", "summary.json", "model/config.json")
    if distributed.broadcast_flag(reuse, ranks):
        return
    say = print if ranks.is_main else (lambda *a, **k: None)  # rank 0 speaks for the group

    # -- data: every logged impression, train users for training, valid users held out -------------------------
    tok = GenPageTokenizer.from_pretrained(pretrained)
    try:
        dataset, table, report = open_stage_dataset(cfg, out, quarantine=ranks.is_main)
        logs = dataset.logs
        check_tokenizer_matches(tok, dataset, table, f"the pretrained checkpoint {pretrained}")
        env = load_environment(cfg.environment, dataset)
    except LogSchemaError as e:
        raise SystemExit(f"malformed logs: {e}") from None
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"dataset error: {e}") from None
    feedback_types = dataset.schema.rewards.feedback_types
    say(f"[data] {report.summary()}")
    encoded = encode_stage_logs(cfg, dataset, table, tok, ranks)  # pretraining's encoding when it is cached
    say(f"[data] {len(encoded)} impressions encoded" + (f" (reused: {encoded.cache_dir})" if encoded.from_cache else ""))
    train, train_table = split_logs(table, tok, "train", encoded, columns=ENTITY_TARGET_COLUMNS)
    valid, valid_table = split_logs(table, tok, "valid", encoded)
    if len(train) == 0 or len(valid) == 0:
        raise SystemExit(f"{logs}: {len(train)} train and {len(valid)} valid impressions; both splits are needed "
                         "(the `split` column, or user ids hashed into splits when it is absent)")
    check_disjoint_users(train, valid)
    if cfg.eval_impressions and len(valid) > cfg.eval_impressions:  # held-out figures on a sample (valid_impressions)
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(valid), cfg.eval_impressions, replace=False))
        valid, valid_table = valid.subset(keep), valid_table.take(keep)
    norm = RewardNormalization.fit(train.page_reward)
    targets = None  # each title's logged outcome, and the reward system read off the logs
    if get_reward_head(cfg.reward_head).needs_entity_targets(cfg.entity_loss_weight):
        try:
            targets = entity_targets(train_table, logs, feedback_types)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        say("[data] reward system in the logs: " + ", ".join(
            f"{name} {v:+.3f} ({n} titles)" for name, v, n in zip(feedback_types, targets.feedback_rewards,
                                                                  targets.feedback_counts))
              + f"; thumbs-up {targets.thumbs_up_reward:+.3f} ({targets.thumbs_up_count} titles)")
    del train_table  # the copy of the train rows' feedback columns, read: its memory back before training
    release_freed_memory()
    say(f"[data] train {len(train)} impressions of {len(set(train.user_ids))} users; valid {len(valid)} of "
          f"{len(set(valid.user_ids))} users; page reward mean {norm.mean:.3f}, std {norm.std:.3f}")

    runs = [InitRun("pretrained", out / "model", out / "checkpoints" / "pretrained", out, "rm")]
    if cfg.scratch_ablation:
        runs.append(InitRun("scratch", out / "scratch_model", out / "checkpoints" / "scratch", out, "rm_scratch"))
    if not ranks.is_main:  # the other ranks train their part of each batch; rank 0 evaluates and writes
        train_inits(runs, cfg, train, valid, norm, tok, None, targets, ranks)
        distributed.leave_group(ranks)
        return

    # -- ground truth (with an environment only): logged pages, and pages the pretrained policy generates ------
    evalset = logged_eval_set(env, valid_table, valid) if env is not None else EvalSet(
        valid.prompts, valid.pages, valid.page_reward.astype(np.float64))
    generated = None
    if env is not None and cfg.generated_users > 0:
        generated = generated_pages(cfg, env, table, tok, out / "generated_pages.json")
        evalset.gen_prompts, evalset.gen_pages = generated["prompts"], generated["pages"]
        evalset.true_gen = np.asarray(generated["true"])

    # -- train and evaluate: pretrained initialization and the random-initialization ablation (at once) ------
    fitted = train_inits(runs, cfg, train, valid, norm, tok, evalset, targets, ranks)
    distributed.leave_group(ranks)
    results = {init: r.metrics for init, r in fitted.items()}
    preds = {f"RM ({init} init)": r.valid_pred for init, r in fitted.items()}

    # -- baselines: the training mean; a bag-of-entities ridge regression ------------------------------------
    fit_on = train
    if cfg.ridge_impressions and len(train) > cfg.ridge_impressions:  # a sample (ridge_impressions in the summary)
        fit_on = train.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(train), cfg.ridge_impressions,
                                                                            replace=False)))
    ridge = BagOfEntitiesRidge(tok, cfg.ridge_lambda).fit(fit_on.prompts, fit_on.pages, fit_on.page_reward)
    preds["bag-of-entities ridge"] = ridge.predict(evalset.prompts, evalset.pages)
    baselines = {"mean": evaluate(lambda prompts, pages: np.full(len(prompts), norm.mean), evalset),
                 "linear": evaluate(ridge.predict, evalset, preds["bag-of-entities ridge"])}

    # -- outputs -------------------------------------------------------------------------------------------
    scatter_plot(out / "pred_vs_observed.png", preds, evalset.observed,
                 f"validation users ({len(valid)} impressions): predicted vs observed page reward")
    summary = dict(results["pretrained"])
    scratch = results.get("scratch", {})  # switched off: its keys are there, as None
    summary.update({"scratch_" + k: scratch.get(k) for k in {*results["pretrained"], *scratch}})
    for name, metrics in baselines.items():
        summary.update({f"baseline_{name}_{k}": v for k, v in metrics.items()})
    summary.update({
        "reward_mean": norm.mean, "reward_std": norm.std, "train_impressions": len(train),
        "valid_impressions": len(valid), "ridge_impressions": len(fit_on), "ridge_solver": ridge.solver, "train_users": len(set(train.user_ids)), "valid_users": len(set(valid.user_ids)),
        "generated_decode_report": generated["decode_report"] if generated else None,
        "generated_true_mean": float(np.mean(generated["true"])) if generated else None,
        "feedback_rewards": dict(zip(feedback_types, targets.feedback_rewards)) if targets else None,
        "thumbs_up_reward": targets.thumbs_up_reward if targets else None,
        "ranks": ranks.world, "bad_rows": report.bad_rows(), "logs": str(logs), "environment": type(env).__name__ if env else None, "config": dataclasses.asdict(cfg),
    })
    write_summary(out / "summary.json", summary)
    (out / "results.md").write_text(
        f"# Reward model on {logs} (validation users: {summary['valid_users']})\n\n" + results_table(summary))
    print(results_table(summary))


if __name__ == "__main__":
    main()
