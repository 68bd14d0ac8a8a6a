"""Stage 3b: weighted binary classification (WBC, paper section 5.2), the post-training the paper shipped.

    python recipes/wbc.py [--config recipes/configs/wbc.yaml] [--force] [key=value ...]

From the pretrained GenPage checkpoint, every row token and impressed title token of the train users' logged
pages gets a label from the sign of its reward and a weight from its size (policies/wbc.py), and the logit of
that token at its position is trained with a weighted per-token sigmoid. Judged on held-out (valid-split)
logged pages by the paper's Table 1 (weighted BCE, sample-weighted row and entity AUC) against the pretrained
model's own logits, a popularity scorer and the same training from a random initialization; then, like the
pretrained policy, by the pages it writes for held-out (test-split) contexts under the rule masks (true reward
where an environment is configured). One run per seed, each resumable from its own checkpoints. Writes
out_dir/seed_<s>/ (checkpoints/, model/: HF directory with weights, config with the business rules, tokenizer),
out_dir/model (the first seed's), scratch/ (the ablation), summary.json (first seed's Table 1 and pages, every
seed's and their mean and spread) and wandb runs (offline).
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

from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import to_dict
from common.training import cosine_lr, init_wandb, latest_checkpoint, load_trainer_state, save_checkpoint
from homepage.dataset import DatasetError, open_stage_dataset
from homepage.environment import load_environment
from policies.build import ModelSize, build_model
from policies.config import WbcConfig
from policies.pretraining import evaluate_pretrained
from policies.rules import RuleSet
from policies.tokenizer import GenPageTokenizer, check_tokenizer_matches
from policies.wbc import (WbcData, collate_wbc, evaluate_scores, popularity_scores, score_tokens, token_values,
                          wbc_data, weighted_bce)


def heldout_bce(model, valid: WbcData) -> float:
    return evaluate_scores(**score_tokens(model, valid))["weighted_bce"]


def fit(model, cfg: WbcConfig, seed: int, train: WbcData, valid: WbcData, ckpt_dir: Path, name: str, out: Path):
    """WBC training of `model` with `seed`'s batch order (resumed from ckpt_dir's latest checkpoint).
    -> (model, history, resumed step)"""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start, extra = load_trainer_state(resume, optimizer) if resume is not None else (0, {})
    history = extra.get("history") or [{"step": 0, "heldout_weighted_bce": heldout_bce(model, valid)}]
    if resume is not None:
        print(f"[wbc:{name}] resuming from {resume} at step {start}")
    run = init_wandb(cfg.wandb_project, ckpt_dir.parent, to_dict(cfg), cfg.wandb_mode, f"wbc_{name}", extra.get("wandb_id"))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"wbc {name}", unit="step")
    for step in bar:
        rng = np.random.default_rng([seed, step])  # batch order is a function of the step: resumable
        batch = collate_wbc(train, rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False))
        lr = cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        bce, weight = weighted_bce(token_values(model, batch), batch["label"], batch["weight"])
        loss = bce / weight.clamp(min=1e-6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        metrics = {"wbc/loss": loss.item(), "wbc/lr": lr, "wbc/grad_norm": grad_norm.item()}
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            metrics["wbc/heldout_weighted_bce"] = heldout_bce(model, valid)
            history.append({"step": step + 1, "heldout_weighted_bce": metrics["wbc/heldout_weighted_bce"]})
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{metrics['wbc/heldout_weighted_bce']:.3f}")
        run.log(metrics, step=step + 1)
        if (step + 1) % cfg.checkpoint_interval == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, {"history": history, "wandb_id": run.id})
    run.finish()
    model.eval()
    return model, history, start if resume is not None else None


def train_seed(cfg: WbcConfig, seed: int, tok, rules, table, env, train: WbcData, valid: WbcData, out: Path) -> dict:
    """One seed's WBC policy from the pretrained checkpoint: trained, saved as out/seed_<seed>/model, its Table 1
    row and the pages it writes for the held-out contexts. -> that seed's results"""
    from transformers import AutoModelForCausalLM

    run_dir = out / f"seed_{seed}"
    model = AutoModelForCausalLM.from_pretrained(cfg.pretrained_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    model, history, resumed = fit(model, cfg, seed, train, valid, run_dir / "checkpoints", f"seed{seed}", out)
    train_s = time.perf_counter() - t0  # the training budget (a resumed run counts only this attempt's steps)
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)  # with the checkpoint's rules (config.json and their tables file)
    tok.save_pretrained(model_dir)
    pages = evaluate_pretrained(model, model_dir, tok, rules, table, env, valid.seqs, cfg.eval_users,
                                cfg.eval_backend, cfg.max_new_tokens, seed=0)  # the pretraining recipe's contexts
    return {"table1": evaluate_scores(**score_tokens(model, valid)), "pages": pages, "history": history,
            "resumed_from_step": resumed, "train_s": train_s}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of per-seed figures."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def main() -> None:
    cfg, args = parse_recipe_args(WbcConfig, "recipes/configs/wbc.yaml", __doc__.splitlines()[1])
    torch.set_num_threads(cfg.num_threads)
    pretrained = Path(cfg.pretrained_dir)
    if not (pretrained / "config.json").exists() or not (pretrained / "genpage_tokenizer.json").exists():
        raise SystemExit(f"{pretrained} holds no pretrained GenPage model with its tokenizer: run "
                         "`python recipes/pretrain.py` first (or set pretrained_dir=...)")
    out = Path(cfg.out_dir)
    if reuse_or_start(out, args.force, "wbc", "summary.json", "model/config.json"):
        return
    t0 = time.perf_counter()

    # -- data: every logged page of the train users; valid users held out -------------------------------------
    tok = GenPageTokenizer.from_pretrained(pretrained)
    try:
        dataset, table, report = open_stage_dataset(cfg, out)
        check_tokenizer_matches(tok, dataset, table, f"the pretrained checkpoint {pretrained}")
        env = load_environment(cfg.environment, dataset)
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"dataset error: {e}") from None
    rules = RuleSet.from_pretrained(pretrained)
    print(f"[data] {report.summary()}")
    train = wbc_data(table, tok, "train", cfg.zero_reward, cfg.zero_weight)
    valid = wbc_data(table, tok, "valid", cfg.zero_reward, cfg.zero_weight)
    valid = valid.subset(range(min(len(valid), cfg.eval_sequences)))
    if len(train) == 0 or len(valid) == 0:
        raise SystemExit("no train or valid impressions: check the logs' splits")
    print(f"[data] train {len(train)} logged pages, held-out {len(valid)} ({cfg.zero_reward} zero-reward titles)")

    # -- Table 1 before training: the pretrained model's own logits and a popularity scorer ----------------------
    from transformers import AutoConfig, AutoModelForCausalLM

    table1 = {"pretrained": evaluate_scores(**score_tokens(AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32), valid)),
              "popularity": evaluate_scores(**popularity_scores(train, valid))}

    # -- WBC from the pretrained checkpoint, one run per seed; from a random initialization (the ablation) -----
    runs = {seed: train_seed(cfg, seed, tok, rules, table, env, train, valid, out) for seed in cfg.seeds}
    first = runs[cfg.seeds[0]]
    table1["wbc"] = first["table1"]
    scratch_history = None
    if cfg.scratch_ablation:
        shape = AutoConfig.from_pretrained(pretrained).to_dict()
        shape.update(shape.get("rope_parameters") or {})  # rope_theta lives there
        size = ModelSize(**{f.name: shape[f.name] for f in dataclasses.fields(ModelSize)})
        scratch = build_model(tok, dataset.content(), size, seed=cfg.seeds[0])
        scratch, scratch_history, _ = fit(scratch, cfg, cfg.seeds[0], train, valid, out / "scratch" / "checkpoints",
                                          "scratch", out)
        table1["wbc_scratch"] = evaluate_scores(**score_tokens(scratch, valid))
        del scratch
    model_dir = out / "model"  # the first seed's policy, where later stages look for "the" WBC model
    shutil.rmtree(out / ".model.tmp", ignore_errors=True)
    shutil.copytree(out / f"seed_{cfg.seeds[0]}" / "model", out / ".model.tmp")
    shutil.rmtree(model_dir, ignore_errors=True)
    (out / ".model.tmp").rename(model_dir)

    per_seed = {str(seed): {**{f"{k}": v for k, v in r["table1"].items()},
                            **{k.replace("pretrained_", ""): v for k, v in r["pages"].items() if k.startswith("true_reward_pretrained")}}
                for seed, r in runs.items()}
    spread = {f"{k}_wbc_mean_std": mean_std([row[k] for row in per_seed.values()]) for k in next(iter(per_seed.values()))}
    summary = {
        "table1": table1,
        **{f"{k}_{name}": v for name, metrics in table1.items() for k, v in metrics.items()},
        **{k.replace("pretrained_", "wbc_"): v for k, v in first["pages"].items()},
        "per_seed": per_seed, **spread, "seeds": list(cfg.seeds),
        "heldout_weighted_bce_history": first["history"],
        "scratch_heldout_weighted_bce_history": scratch_history,
        "resumed_from_step": first["resumed_from_step"],
        "train_pages": len(train), "heldout_pages": len(valid),
        "steps": cfg.steps, "pages_seen": cfg.steps * min(cfg.batch_size, len(train)),  # per seed
        "train_s_per_seed": [r["train_s"] for r in runs.values()],  # fit() alone, held-out BCE checks included
        "bad_rows": report.bad_rows(),
        "wall_s": time.perf_counter() - t0,
        "config": to_dict(cfg),
    }
    write_summary(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == "__main__":
    main()
