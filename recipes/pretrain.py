"""Stage 2: pretrain GenPage by next-token prediction on positively engaged pages (paper section 5.1).

    python recipes/pretrain.py [--config recipes/configs/pretrain.yaml] [--force] [key=value ...]

Reads a dataset directory (docs/dataset.md; recipes/make_world.py writes the toy one): the tokenizer and the
business rules are built from it and saved whole in the checkpoint. Loss on page tokens only (the context is the
prompt). Judged on held-out (test-split) logged contexts by what the logs allow (held-out loss, the recall of
each impression's engaged titles) and, where an environment is configured, by its ground truth
(policies/pretraining.py). Resumes from the last checkpoint in out_dir/checkpoints when interrupted. Writes
out_dir/model (HF directory: weights, config, tokenizer), out_dir/summary.json and a wandb run (offline).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import distributed
from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import to_dict
from common.training import cosine_lr, init_wandb, latest_checkpoint, load_trainer_state, save_checkpoint
from homepage.dataset import DatasetError, open_stage_dataset
from homepage.environment import load_environment
from policies.build import build_model
from policies.cold_start import cold_start_report
from policies.config import PretrainConfig
from policies.data import collate, encode_stage_logs, page_token_nll
from policies.evaluation import popularity_page_loss, unigram_page_loss
from policies.pretraining import evaluate_pretrained, heldout_loss, pick_cold_start_titles
from policies.rules import build_ruleset
from policies.tokenizer import GenPageTokenizer


def main() -> None:
    cfg, args = parse_recipe_args(PretrainConfig, "recipes/configs/pretrain.yaml", __doc__.splitlines()[1])
    torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    ranks = distributed.init_ranks()  # under torchrun: this rank of the data-parallel group (common/distributed.py)
    ranks.check_batch(cfg.batch_size)
    reuse = ranks.is_main and reuse_or_start(out, args.force, "pretrain", "summary.json", "model/config.json")
    if distributed.broadcast_flag(reuse, ranks):
        return

    # -- data -------------------------------------------------------------------------------------------------
    try:
        dataset, table, report = open_stage_dataset(cfg, out, quarantine=ranks.is_main)
        env = load_environment(cfg.environment, dataset)
        tok = GenPageTokenizer.from_dataset(dataset, table)
        rules = build_ruleset(tok, dataset, cfg.rules)  # saved in config.json: every process loads the same rules
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"dataset error: {e}") from None
    content = dataset.content()
    say = print if ranks.is_main else (lambda *a, **k: None)  # rank 0 speaks for the group
    say(f"[data] {report.summary()}; environment: {type(env).__name__ if env else 'none (offline metrics only)'}")
    cold = pick_cold_start_titles(table, tok.entity_ids, cfg.cold_start_titles, cfg.seed)
    encoded = encode_stage_logs(cfg, dataset, table, tok, ranks)  # every impression, once (cached for train_rm)
    say(f"[data] {len(encoded)} impressions encoded" + (f" (reused: {encoded.cache_dir})" if encoded.from_cache else ""))
    train, skipped_train = encoded.select(tok, "train", min_page_reward=0.0, exclude_entities=frozenset(cold))
    valid, skipped_valid = encoded.select(tok, "valid", min_page_reward=0.0, exclude_entities=frozenset(cold))
    valid = valid.subset(range(min(len(valid), cfg.eval_sequences)))
    say(f"[data] train {len(train)} positive pages (left out: {skipped_train}); held-out {len(valid)} (left out: {skipped_valid})")
    say(f"[data] cold-start titles held out of training: {cold}")
    if len(train) == 0 or len(valid) == 0:
        raise SystemExit("no training or validation pages left: check the logs' splits and page rewards")

    # -- model, optimizer, resume -----------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    distributed.barrier(ranks)  # every rank resumes from the same checkpoint
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32)
    else:
        model = build_model(tok, content, cfg.model, seed=cfg.seed)
    model.train()
    trained = distributed.wrap(model, ranks)  # forward/backward through DDP: gradients averaged over the ranks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start, extra = (load_trainer_state(resume, optimizer) if resume is not None else (0, {}))
    history = extra.get("history", [])
    if not history and ranks.is_main:  # the untrained model's held-out loss, the reference the smoke test compares to
        history.append({"step": 0, "heldout_page_loss": heldout_loss(model, valid, 64, tok.pad_id)})
    if resume is not None and ranks.is_main:
        print(f"[pretrain] resuming from {resume} at step {start}")
    if ranks.distributed and ranks.is_main:
        print(f"[pretrain] data parallel: {ranks.world} ranks, {cfg.batch_size // ranks.world} of the global batch of "
              f"{cfg.batch_size} each")
    run = init_wandb(cfg.wandb_project, out, to_dict(cfg), cfg.wandb_mode if ranks.is_main else "disabled",
                     "pretrain", extra.get("wandb_id"))
    n_params = sum(p.numel() for p in params)

    # -- train ------------------------------------------------------------------------------------------------
    tokens_seen, t_train = 0, 0.0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", unit="step",
               disable=not ranks.is_main)
    for step in bar:
        batch_rng = np.random.default_rng([cfg.seed, step])  # batch order is a function of the step: resumable
        idx = batch_rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        idx = ranks.shard(idx)  # this rank's rows of the global batch
        if ranks.distributed:  # each rank its own fallback-token draws, a function of the step (resumable)
            torch.manual_seed(int(np.random.default_rng([cfg.seed, step, ranks.rank]).integers(2**62)))
        batch = collate([train.prompts[i] for i in idx], [train.pages[i] for i in idx], tok.pad_id)
        lr = cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        nll, n = page_token_nll(trained, batch)
        n_global = distributed.global_sum(n.item(), ranks)  # the loss is per page token of the whole batch
        loss = nll / n * distributed.global_scale(n.item(), n_global, ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        t_train += time.perf_counter() - t0
        tokens_seen += int(distributed.global_sum(int(batch["attention_mask"].sum()), ranks))
        batch_loss = distributed.global_sum(nll.item(), ranks) / n_global  # the global batch's, on every rank
        metrics = {"pretrain/loss": batch_loss, "pretrain/lr": lr, "pretrain/grad_norm": grad_norm.item(),
                   "pretrain/tokens_per_s": tokens_seen / t_train}
        if ranks.is_main and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps):
            metrics["pretrain/heldout_page_loss"] = heldout_loss(model, valid, 64, tok.pad_id)
            history.append({"step": step + 1, "train_loss": batch_loss,
                            "heldout_page_loss": metrics["pretrain/heldout_page_loss"]})
            bar.set_postfix(loss=f"{batch_loss:.3f}", heldout=f"{metrics['pretrain/heldout_page_loss']:.3f}")
        run.log(metrics, step=step + 1)
        if ranks.is_main and ((step + 1) % cfg.checkpoint_interval == 0 or step + 1 == cfg.steps):
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, {"history": history, "wandb_id": run.id})
    tokens_per_s = tokens_seen / t_train if t_train else None
    distributed.leave_group(ranks)
    if not ranks.is_main:  # rank 0 saves, evaluates and writes the summary
        run.finish()
        return

    # -- final HF directory -----------------------------------------------------------------------------------
    model.eval()
    model_dir = out / "model"
    model.attach_rules(rules)  # its header in config.json, its tables file beside it
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # -- evaluation on held-out logged contexts: page loss vs baselines, engaged-title recall, true reward (with an
    # environment), vLLM parity, cold start -------------------------------------------------------------------
    heldout = history[-1]["heldout_page_loss"]  # evaluated at the last step (saved with its checkpoint)
    evaluation = evaluate_pretrained(model, model_dir, tok, rules, table, env, valid, cfg.eval_users,
                                     cfg.eval_backend, cfg.max_new_tokens, cfg.seed)
    cold_report = cold_start_report(model, tok, content, cold) if cold else {}
    summary = {
        "heldout_page_loss": heldout,
        "unigram_page_loss": unigram_page_loss(tok, train.pages, valid.pages),
        "popularity_page_loss": popularity_page_loss(tok, train.pages, valid.pages),
        **evaluation,
        "tokens_per_s": tokens_per_s,
        "parameters": n_params,
        "ranks": ranks.world,
        "train_pages": len(train),
        "heldout_pages": len(valid),
        "cold_start": cold_report,
        "loss_history": history,
        "left_out": {"train": skipped_train, "valid": skipped_valid},
        "bad_rows": report.bad_rows(),
        "config": to_dict(cfg),
    }
    write_summary(out / "summary.json", summary)
    run.summary.update({f"pretrain/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    run.finish()
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == "__main__":
    main()
