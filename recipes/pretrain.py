"""Stage 2: pretrain GenPage by next-token prediction on positively engaged pages (paper section 5.1).

    python recipes/pretrain.py [--config recipes/configs/pretrain.yaml] [--force] [key=value ...]

Reads a dataset directory (docs/dataset.md; recipes/make_world.py writes the toy one): the tokenizer and the
business rules are built from it and saved whole in the checkpoint. Loss on page tokens only (the context is the
prompt). Judged on held-out (test-split) logged contexts by what the logs allow (held-out loss, the recall of
each impression's engaged titles) and, where an environment is configured, by its ground truth. Resumes from the last checkpoint in out_dir/checkpoints when interrupted. Writes out_dir/model (HF
directory: weights, config, tokenizer), out_dir/summary.json and a wandb run (offline by default).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from homepage.dataset import DatasetError, open_dataset
from homepage.environment import load_environment
from homepage.logs import engaged_titles, other_page_of_user, sample_impressions
from homepage.recipe_utils import parse_recipe_args, write_summary
from policies.build import build_model
from policies.cold_start import cold_start_report
from policies.configs import PretrainConfig
from policies.data import collate, encode_table, page_token_nll
from policies.evaluation import engaged_recall, pages_from_tokens, popularity_page_loss, unigram_page_loss
from policies.hf_generation import generate_pages_hf
from policies.rules import build_ruleset
from policies.tokenizer import GenPageTokenizer
from policies.training import cosine_lr, init_wandb, latest_checkpoint, load_trainer_state, save_checkpoint


def heldout_loss(model, data, batch_size: int, pad_id: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            nll, n = page_token_nll(model, collate(data.prompts[s:s + batch_size], data.pages[s:s + batch_size], pad_id))
            total, count = total + nll.item(), count + n.item()
    model.train(was_training)
    return total / count


def pick_cold_start_titles(table, entity_ids: list[str], n: int, seed: int) -> list[str]:
    """n titles drawn from the 10% least present in the logs, so holding them out costs few pages."""
    if n == 0:
        return []
    import pyarrow.compute as pc

    flat = pc.list_flatten(pc.list_flatten(table.column("page_entity_ids")))
    hist = pc.list_flatten(table.column("history_entity_ids"))
    counts = dict.fromkeys(entity_ids, 0)
    for col in (flat, hist):
        for item in pc.value_counts(col).to_pylist():
            if item["values"] in counts:
                counts[item["values"]] += item["counts"]
    rare = sorted(entity_ids, key=lambda e: (counts[e], e))[: max(n, len(entity_ids) // 10)]
    return sorted(np.random.default_rng(seed).choice(rare, size=n, replace=False).tolist())


def _nanmean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def main() -> None:
    cfg, args = parse_recipe_args(PretrainConfig, "recipes/configs/pretrain.yaml", __doc__.splitlines()[1])
    torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    if args.force and out.exists():
        shutil.rmtree(out)
    if (out / "summary.json").exists() and (out / "model" / "config.json").exists():
        print(f"[pretrain] reusing {out} (pass --force to retrain)")
        return
    out.mkdir(parents=True, exist_ok=True)

    # -- data -------------------------------------------------------------------------------------------------
    try:
        dataset, table, report = open_dataset(cfg.data_dir)
        env = load_environment(cfg.environment, dataset)
        tok = GenPageTokenizer.from_dataset(dataset, table)
        rules = build_ruleset(tok, dataset, cfg.rules)  # saved in config.json: every process loads the same rules
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"dataset error: {e}") from None
    content = dataset.content()
    print(f"[data] {report.summary()}; environment: {type(env).__name__ if env else 'none (offline metrics only)'}")
    cold = pick_cold_start_titles(table, tok.entity_ids, cfg.cold_start_titles, cfg.seed)
    train, skipped_train = encode_table(table, tok, split="train", min_page_reward=0.0, exclude_entities=frozenset(cold))
    valid, skipped_valid = encode_table(table, tok, split="valid", min_page_reward=0.0, exclude_entities=frozenset(cold))
    valid = valid.subset(range(min(len(valid), cfg.eval_sequences)))
    print(f"[data] train {len(train)} positive pages (left out: {skipped_train}); held-out {len(valid)} (left out: {skipped_valid})")
    print(f"[data] cold-start titles held out of training: {cold}")
    if len(train) == 0 or len(valid) == 0:
        raise SystemExit("no training or validation pages left: check the logs' splits and page rewards")

    # -- model, optimizer, resume -----------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32)
    else:
        model = build_model(tok, content, cfg.model, seed=cfg.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start, extra = (load_trainer_state(resume, optimizer) if resume is not None else (0, {}))
    history = extra.get("history", [])
    if not history:  # the untrained model's held-out loss, the reference the smoke test compares to
        history.append({"step": 0, "heldout_page_loss": heldout_loss(model, valid, 64, tok.pad_id)})
    if resume is not None:
        print(f"[pretrain] resuming from {resume} at step {start}")
    run = init_wandb(cfg.wandb_project, out, dataclasses.asdict(cfg), cfg.wandb_mode, "pretrain", extra.get("wandb_id"))
    n_params = sum(p.numel() for p in params)

    # -- train ------------------------------------------------------------------------------------------------
    tokens_seen, t_train = 0, 0.0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", unit="step")
    for step in bar:
        batch_rng = np.random.default_rng([cfg.seed, step])  # batch order is a function of the step: resumable
        idx = batch_rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        batch = collate([train.prompts[i] for i in idx], [train.pages[i] for i in idx], tok.pad_id)
        lr = cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        nll, n = page_token_nll(model, batch)
        loss = nll / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        t_train += time.perf_counter() - t0
        tokens_seen += int(batch["attention_mask"].sum())
        metrics = {"pretrain/loss": loss.item(), "pretrain/lr": lr, "pretrain/grad_norm": grad_norm.item(),
                   "pretrain/tokens_per_s": tokens_seen / t_train}
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            metrics["pretrain/heldout_page_loss"] = heldout_loss(model, valid, 64, tok.pad_id)
            history.append({"step": step + 1, "heldout_page_loss": metrics["pretrain/heldout_page_loss"]})
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{metrics['pretrain/heldout_page_loss']:.3f}")
        run.log(metrics, step=step + 1)
        if (step + 1) % cfg.checkpoint_interval == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, {"history": history, "wandb_id": run.id})
    tokens_per_s = tokens_seen / t_train if t_train else None

    # -- final HF directory -----------------------------------------------------------------------------------
    model.eval()
    model_dir = out / "model"
    model.config.business_rules = rules.to_dict()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # -- evaluation on held-out logged contexts: page loss vs baselines, engaged-title recall, true reward (with an
    # environment), vLLM parity, cold start -------------------------------------------------------------------
    heldout = history[-1]["heldout_page_loss"]  # evaluated at the last step (saved with its checkpoint)
    unigram = unigram_page_loss(tok, train.pages, valid.pages)
    popularity = popularity_page_loss(tok, train.pages, valid.pages)
    heldout_imps = sample_impressions(table, "test", cfg.eval_users, cfg.seed)
    contexts = [imp.context for imp in heldout_imps]
    engaged = [engaged_titles(imp) for imp in heldout_imps]
    prompts = [tok.encode_context(c) for c in contexts]
    # the logging policy's recall: on the same user's other logged page (its own page holds every engaged title)
    others = other_page_of_user(heldout_imps, table)
    pairs = [(page, e) for page, e in zip(others, engaged) if page is not None]
    recall = {"logging": _nanmean(engaged_recall([p for p, _ in pairs], [e for _, e in pairs]))}
    true = {"logging": env.true_page_reward(contexts, [imp.page for imp in heldout_imps]) if env else None}
    parity = None
    modes = {"sampled": (1.0, False), "greedy": (0.0, False), "masked_sampled": (1.0, True), "masked_greedy": (0.0, True)}
    if cfg.eval_backend == "vllm":
        from policies import vllm_engine
        from policies.vllm_rules import OPT_OUT_KEY

        llm = vllm_engine.make_llm(model_dir, seed=cfg.seed)  # the rule logits processor reads the saved rules
        gen = {name: [s[0]["token_ids"] for s in vllm_engine.generate(
            llm, prompts, temp, cfg.max_new_tokens, tok.eop_id, extra_args=None if masked else {OPT_OUT_KEY: False})]
            for name, (temp, masked) in modes.items()}
        seqs = [p + g for p, g in zip(valid.prompts[:64], valid.pages[:64])]
        vllm_lp = vllm_engine.sequence_logprobs(llm, seqs)
        with torch.no_grad():
            diffs = []
            for s, v in zip(seqs, vllm_lp):
                lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)  # eval mode: no fallback swaps
                hf = lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].numpy()
                diffs.append(np.abs(hf - np.array(v)).max())
        parity = float(max(diffs))
        del llm
    else:
        gen = {}
        for name, (temp, masked) in modes.items():
            torch.manual_seed(cfg.seed)
            gen[name] = generate_pages_hf(model, tok, prompts, temp, cfg.max_new_tokens, rules=rules if masked else None)
    decode_reports, recall_true = {}, {}
    for name, pages in gen.items():
        structured, rep = pages_from_tokens(tok, pages)
        page_recall = engaged_recall(structured, engaged)
        recall[name] = _nanmean(page_recall)
        true[name] = env.true_page_reward(contexts, structured) if env else None
        if env is not None:  # does the offline metric rank this policy's pages as the truth does?
            ok = np.isfinite(page_recall)
            recall_true[name] = float(np.corrcoef(page_recall[ok], true[name][ok])[0, 1]) if ok.sum() > 2 else None
        decode_reports[name] = dataclasses.asdict(rep)
    violations = {name: {r: int(v.sum()) for r, v in rules.violations(prompts, pages).items()} for name, pages in gen.items()}

    cold_report = cold_start_report(model, tok, content, cold) if cold else {}
    summary = {
        "heldout_page_loss": heldout,
        "unigram_page_loss": unigram,
        "popularity_page_loss": popularity,
        **{f"recall_{name}": v for name, v in recall.items()},  # engaged titles of the held-out impression on the page
        **({f"true_reward_{'logging' if name == 'logging' else 'pretrained_' + name}": float(v.mean())
            for name, v in true.items()} if env else {}),
        **({f"{name}_vs_logging": float(true[name].mean() / true["logging"].mean()) for name in gen} if env else {}),
        "environment": type(env).__name__ if env else None,
        **({"recall_true_pearson": recall_true} if env else {}),
        "vllm_hf_max_abs_logprob_diff": parity,
        "tokens_per_s": tokens_per_s,
        "parameters": n_params,
        "train_pages": len(train),
        "heldout_pages": len(valid),
        "eval_contexts": len(contexts),
        "eval_backend": cfg.eval_backend,
        "decode_reports": decode_reports,
        "rule_violations": violations,
        "cold_start": cold_report,
        "loss_history": history,
        "left_out": {"train": skipped_train, "valid": skipped_valid},
        "config": dataclasses.asdict(cfg),
    }
    write_summary(out / "summary.json", summary)
    run.summary.update({f"pretrain/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    run.finish()
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == "__main__":
    main()
