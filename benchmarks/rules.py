"""Business rules on vLLM: an audit of mask-rule violations in pages sampled from the pretrained model, what
the model breaks without masks (what constrained decoding saves), vLLM-vs-HF log-prob parity under masks,
and the cost of the mask in generation time.

    python benchmarks/rules.py [--model runs/pretrain/model] [--world runs/world] [--out runs/rules] [--pages 10000]

Writes runs/rules/summary.json (pages_sampled, mask_violations, unmasked_violations,
vllm_hf_masked_max_abs_logprob_diff, mask_overhead_ratio, ...) and runs/rules/violations.md.
Two rule variants are audited: the checkpoint's rules (default: Continue Watching within the first 2 rows) and
the same with Trending Now pinned first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import write_summary
from homepage.catalog import TRENDING
from homepage.world import World, world_contexts
from policies.data import pad_batch
from policies.rules import RULES, RuleSet, attach_rules, dataset_ruleset
from policies.tokenizer import GenPageTokenizer

MAX_TOKENS = 64


def checkpoint_with_rules(model_dir: Path, out: Path, rules: RuleSet) -> Path:
    """A copy of the checkpoint carrying `rules` (vLLM's rule processor reads them from config.json)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("checkpoints"))
    attach_rules(out, rules)
    return out


def sample(llm, prompts, n, temperature=1.0, masked=True, logprobs=False):
    """-> (prompt per page, pages, log-probs per page, seconds). Sampled at temperature 1 (the policy itself)."""
    from policies import vllm_engine
    from policies.vllm_rules import OPT_OUT_KEY

    t0 = time.perf_counter()
    out = vllm_engine.generate(llm, prompts, temperature, MAX_TOKENS, EOP[0], n=n, logprobs=logprobs,
                               extra_args=None if masked else {OPT_OUT_KEY: False})
    dt = time.perf_counter() - t0
    ps = [p for p, o in zip(prompts, out) for _ in o]
    return ps, [s["token_ids"] for o in out for s in o], [s["logprobs"] for o in out for s in o], dt


EOP = [None]  # the tokenizer's [EOP] id, set in main


def totals(v: dict) -> dict:
    return {r: int(x.sum()) for r, x in v.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/pretrain/model")
    ap.add_argument("--world", default="runs/world")
    ap.add_argument("--out", default="runs/rules")
    ap.add_argument("--pages", type=int, default=10_000, help="pages sampled under the checkpoint's rules")
    ap.add_argument("--pinned-pages", type=int, default=2_000, help="pages sampled with Trending Now pinned first")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--timing-prompts", type=int, default=500, help="prompts of the masked/unmasked timing and violation table")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    model_dir, world_dir, out = Path(args.model), Path(args.world), Path(args.out)
    for need, cmd in ((world_dir / "simulator" / "world.json", "python recipes/make_world.py"), (model_dir / "config.json", "python recipes/pretrain.py")):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run `{cmd}` first")
    if (out / "summary.json").exists() and not args.force:
        print(f"[rules] reusing {out}/summary.json (pass --force to measure again)")
        return
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    world = World.load(world_dir)
    tok = GenPageTokenizer.from_pretrained(model_dir)
    EOP[0] = tok.eop_id
    cfg = json.loads((model_dir / "config.json").read_text())
    rules = RuleSet.from_pretrained(model_dir) if cfg.get("business_rules") else dataset_ruleset(world_dir, tok=tok)
    pinned = RuleSet(dataclasses.replace(rules.config, pinned_rows={TRENDING: 0}), rules.tables)

    # Varied prompts: held-out users (adults and kids profiles, with and without titles to resume).
    k = args.samples_per_prompt
    rng = np.random.default_rng(0)
    users = world.sample_users(rng, -(-args.pages // k), split="test")
    req = world.sample_requests(rng, users)
    prompts = [tok.encode_context(c) for c in world_contexts(world, users, req)]
    resumable, profile_ok = rules.prompt_facts(*_padded(prompts, tok.pad_id))
    kids = ~profile_ok[:, rules.is_entity].all(-1)  # [B] a restricted profile
    n_resumable = resumable.sum(-1)
    variety = {"prompts": len(prompts), "kids_profiles": int(kids.sum()),
               "with_a_row_of_titles_to_resume": int((n_resumable >= rules.config.shape.min_row_len).sum()),
               "without_a_row_of_titles_to_resume": int((n_resumable < rules.config.shape.min_row_len).sum())}
    print(f"[rules] prompts: {variety}")

    from policies import vllm_engine

    # -- the checkpoint's rules: audit, unmasked table, timing, parity ----------------------------------------
    llm = vllm_engine.make_llm(checkpoint_with_rules(model_dir, out / "model_rules", rules), seed=0,
                               logprobs_mode="processed_logprobs")
    sample(llm, prompts[:64], 1)  # warm-up
    ps, pages, _, t_audit = sample(llm, prompts, k)
    audit = totals(rules.violations(ps, pages))
    n_audit = len(pages)
    print(f"[rules] {len(pages)} masked pages in {t_audit:.1f} s: violations {audit}")
    timing = {"masked_s": [], "unmasked_s": [], "masked_tokens": 0, "unmasked_tokens": 0}
    tp = prompts[: args.timing_prompts]
    for _ in range(2):  # alternate to spread machine noise over both
        for masked in (True, False):
            p2, g2, _, dt = sample(llm, tp, 2, masked=masked)
            key = "masked" if masked else "unmasked"
            timing[f"{key}_s"].append(dt)
            timing[f"{key}_tokens"] = sum(map(len, g2))
            if not masked:
                unmasked_pages = (p2, g2)
    unmasked = totals(rules.violations(*unmasked_pages))
    overhead = sum(timing["masked_s"]) / sum(timing["unmasked_s"])
    per_token = (sum(timing["masked_s"]) / timing["masked_tokens"]) / (sum(timing["unmasked_s"]) / timing["unmasked_tokens"])
    print(f"[rules] unmasked violations in {len(unmasked_pages[1])} pages: {unmasked}; mask overhead x{overhead:.3f}")

    from transformers import AutoModelForCausalLM

    import policies  # noqa: F401  (registers GenPage)

    hf = AutoModelForCausalLM.from_pretrained(out / "model_rules", dtype=torch.float32).eval()
    hf.config.mask_logits = True  # mask replay in forward: the trainer's view of the same pages
    ps, pages, lps, _ = sample(llm, prompts[:64], 1, logprobs=True)
    worst = 0.0
    with torch.no_grad():
        for p, g, lp in zip(ps, pages, lps):
            lsm = torch.log_softmax(hf(torch.tensor([p + g])).logits[0], -1)[len(p) - 1: len(p) + len(g) - 1]
            worst = max(worst, float(np.abs(lsm.gather(-1, torch.tensor(g)[:, None]).squeeze(-1).numpy() - np.array(lp)).max()))
    print(f"[rules] vLLM vs HF (mask replayed) max |log-prob diff| over {len(pages)} sampled pages: {worst:.2e}")
    del llm

    # -- Trending Now pinned first ------------------------------------------------------------------------------
    llm = vllm_engine.make_llm(checkpoint_with_rules(model_dir, out / "model_pinned", pinned), seed=1)
    n_pin = -(-args.pinned_pages // 2)
    ps, pinned_pages, _, _ = sample(llm, prompts[:n_pin], 2)
    pinned_audit = totals(pinned.violations(ps, pinned_pages))
    trending_first = float(np.mean([p[0] == tok.vocab[f"row:{TRENDING}"] for p in pinned_pages]))
    print(f"[rules] {len(pinned_pages)} pinned pages: violations {pinned_audit}; Trending Now first in {trending_first:.1%}")
    del llm
    for d in ("model_rules", "model_pinned"):
        shutil.rmtree(out / d)

    mask_rules = list(rules.masked_rules)
    summary = {
        "pages_sampled": n_audit + len(pinned_pages),
        "pages_sampled_default_rules": n_audit,
        "pages_sampled_pinned_rules": len(pinned_pages),
        "mask_rules": mask_rules,
        "mask_violations": {r: audit[r] + pinned_audit[r] for r in mask_rules} | {"total": audit["total"] + pinned_audit["total"]},
        "mask_violations_default_rules": audit,
        "mask_violations_pinned_rules": pinned_audit,
        "unmasked_violations": {r: unmasked[r] for r in RULES if r in unmasked},
        "unmasked_pages": len(unmasked_pages[1]),
        "unmasked_pages_with_violations": int((rules.violations(*unmasked_pages)["total"] > 0).sum()),
        "vllm_hf_masked_max_abs_logprob_diff": worst,
        "mask_overhead_ratio": overhead,
        "mask_overhead_ratio_per_token": per_token,
        "timing": timing,
        "pinned_row_first_fraction": trending_first,
        "prompt_variety": variety,
        "audit_pages_per_s": n_audit / t_audit,
        "wall_s": time.perf_counter() - t_start,
    }
    write_summary(out / "summary.json", summary)
    lines = ["| rule | mode | violations without masks | with masks |", "|---|---|---|---|"]
    for r in RULES:
        mode = getattr(rules.config.modes, r)
        lines.append(f"| {r} | {mode} | {unmasked.get(r, '-')} / {len(unmasked_pages[1])} pages | "
                     f"{summary['mask_violations'].get(r, '-')} / {summary['pages_sampled']} pages |")
    (out / "violations.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))


def _padded(prompts, pad):
    ids, mask = pad_batch(prompts, pad)
    return ids, mask.sum(-1)


if __name__ == "__main__":
    main()
