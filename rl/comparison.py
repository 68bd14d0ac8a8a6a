"""Post-training methods side by side on one dataset's held-out users (`python recipes/compare.py`).

Every checkpoint of every method (pretrained, WBC, Dr. GRPO, the middle grounds; one checkpoint per seed) is
judged the same way:
- the paper's Table 1: its raw next-token logits as values of the held-out (valid-split) logged pages' tokens,
  weighted BCE and sample-weighted row and entity AUC (policies.wbc);
- the pages it writes for the same held-out (test-split) logged contexts under the rule masks, greedy and
  sampled at temperature 1, scored by one `PageJudge` (rl.reward_manager): true expected page reward where an
  environment is configured, reward-model score, diversity, titles per page and rule violations.
The logged pages of the same contexts are the logging policy's row. Per method, each figure's mean and sample
standard deviation over its checkpoints, and the training budget read off the summary.json of the run that
wrote them (steps, pages seen, wall time).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

MODES = {"masked_greedy": 0.0, "masked_sampled": 1.0}  # decoding of the compared pages: temperature, masks on
PAGE_FIGURES = ("true_reward", "rm_reward", "diversity", "titles_per_page", "violations")
TABLE1_FIGURES = ("weighted_bce", "row_auc", "entity_auc")


def parse_methods(specs: tuple[str, ...] | list[str], root: Path = Path(".")) -> dict[str, list[Path]]:
    """"name=pattern[,pattern...]" -> {name: checkpoint directories}; a pattern is a directory or a glob
    (`runs/dr_grpo/seed_*/model`), matches sorted. A name given twice, a spec without "=" or a pattern that
    matches no checkpoint (no config.json) is refused with the spec named."""
    methods: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, patterns = spec.partition("=")
        name = name.strip()
        if not sep or not name or not patterns.strip():
            raise ValueError(f"method {spec!r}: write it as name=checkpoint_dir (a glob, or several joined by commas), "
                             "e.g. dr_grpo=runs/dr_grpo/seed_*/model")
        if name in methods:
            raise ValueError(f"method {name!r} is given twice")
        found: list[Path] = []
        for pattern in patterns.split(","):
            matches = sorted(Path(p) for p in glob.glob(str(root / pattern.strip())) if (Path(p) / "config.json").exists())
            if not matches:
                raise ValueError(f"method {name!r}: {pattern.strip()!r} matches no checkpoint directory (one with a "
                                 "config.json): train it first, or drop the method")
            found += [m for m in matches if m not in found]
        methods[name] = found
    return methods


def run_budget(checkpoint: Path) -> dict | None:
    """The training budget of the run that wrote `checkpoint`: from the summary.json of its nearest parent
    directory that has one (None if none does). -> {steps, pages_seen (per seed), seeds, wall_s (the run's,
    all its seeds, evaluation and start-up included), wall_s_per_seed, train_s_per_seed (the training itself,
    mean over seeds: WBC's fit, Dr. GRPO's steps), run}"""
    for run in [checkpoint, *checkpoint.parents][1:4]:
        path = run / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            break
    else:
        return None
    config = summary.get("config") or {}
    steps = summary.get("steps", config.get("steps"))
    pages = summary.get("pages_seen")
    if pages is None and steps is not None and "group_size" in config:  # Dr. GRPO: sampled pages, each RM-scored
        pages = steps * config["prompts_per_step"] * config["group_size"]
    seeds = len(summary.get("seeds") or [0])
    wall = summary.get("wall_s")
    train = summary.get("train_s_per_seed")
    train = float(np.mean(train)) if train else None
    if train is None and summary.get("step_time_s_mean") is not None and steps is not None:
        train = summary["step_time_s_mean"] * steps
    return {"run": str(run), "steps": steps, "pages_seen": pages, "seeds": seeds, "wall_s": wall,
            "wall_s_per_seed": wall / seeds if wall is not None else None, "train_s_per_seed": train}


def page_figures(judgement) -> dict[str, float]:
    """Means over pages of one judged set of pages (rl.reward_manager.PageJudgement); violations summed."""
    return {"true_reward": float(np.mean(judgement.true)) if np.isfinite(judgement.true).all() else None,
            "rm_reward": float(np.mean(judgement.rm)), "diversity": float(np.mean(judgement.diversity)),
            "titles_per_page": float(np.mean(judgement.n_entities)),
            "violations": int(sum(v.sum() for v in judgement.violations.values()))}


def mean_std(values: list[float | None]) -> dict[str, float | None]:
    """{mean, std (sample; 0 for one value), per_seed} of per-checkpoint figures (None where any is None)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "per_seed": values}
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "per_seed": [float(x) for x in v]}


def aggregate(per_checkpoint: dict[str, list[dict]], baseline: str = "pretrained") -> dict[str, dict]:
    """Per method, mean and spread of each figure over its checkpoints, and the true-reward gain of each mode
    over the `baseline` method's mean in the same mode (when both have a true reward).
    per_checkpoint: {method: [{"weighted_bce": .., "masked_greedy": {figure: ..}, ...}, ...]}"""
    out: dict[str, dict] = {}
    for method, rows in per_checkpoint.items():
        agg: dict = {"checkpoints": len(rows)}
        for figure in TABLE1_FIGURES:
            if all(figure in r for r in rows):
                agg[figure] = mean_std([r[figure] for r in rows])
        for mode in MODES:
            if all(mode in r for r in rows):
                agg[mode] = {figure: mean_std([r[mode][figure] for r in rows]) for figure in PAGE_FIGURES}
        out[method] = agg
    if baseline in out:
        for method, agg in out.items():
            for mode in MODES:
                base = out[baseline].get(mode, {}).get("true_reward", {}).get("mean")
                mine = agg.get(mode, {}).get("true_reward", {})
                if base and mine.get("mean") is not None:
                    gains = [v / base - 1 for v in mine["per_seed"]]
                    agg[mode]["true_reward_gain"] = mean_std(gains)
    return out


def rankings(methods: dict[str, dict], mode: str = "masked_greedy") -> dict[str, list[str]]:
    """The methods ranked best first by entity AUC (the paper's offline metric) and, where an environment gave
    one, by the true reward of their `mode` pages."""
    auc = [m for m, a in methods.items() if a.get("entity_auc", {}).get("mean") is not None]
    out = {"entity_auc": sorted(auc, key=lambda m: -methods[m]["entity_auc"]["mean"])}
    true = [m for m, a in methods.items() if a.get(mode, {}).get("true_reward", {}).get("mean") is not None]
    if true:
        out[f"true_reward_{mode}"] = sorted(true, key=lambda m: -methods[m][mode]["true_reward"]["mean"])
    return out


def generate_pages(path: Path, model, tok, rules, prompts: list[list[int]], max_new_tokens: int, seed: int,
                   backend: str) -> dict[str, list[list[int]]]:
    """The checkpoint's masked greedy and sampled pages for `prompts`, from vLLM (the serving engine, its rule
    logits processor reading the saved rules) or HF generate with the rules' logits processor."""
    import torch

    if backend == "vllm":
        from policies import vllm_engine

        llm = vllm_engine.make_llm(path, seed=seed)
        pages = {mode: [s[0]["token_ids"] for s in vllm_engine.generate(llm, prompts, temp, max_new_tokens, tok.eop_id)]
                 for mode, temp in MODES.items()}
        del llm
        return pages
    from policies.hf_generation import generate_pages_hf

    pages = {}
    for mode, temp in MODES.items():
        torch.manual_seed(seed)
        pages[mode] = generate_pages_hf(model, tok, prompts, temp, max_new_tokens, rules=rules)
    return pages


def evaluate_checkpoint(path: Path, judge, prompts: list[list[int]], infos: list[dict], valid, max_new_tokens: int,
                        seed: int, backend: str) -> dict:
    """Table 1 and the masked pages' figures of one checkpoint (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from policies.rules import RuleSet
    from policies.wbc import evaluate_scores, score_tokens

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.config.mask_logits = False  # Table 1 scores the raw values (an RL export replays the masks in forward)
    row = {"checkpoint": str(path), **evaluate_scores(**score_tokens(model, valid))}
    pages = generate_pages(path, model, judge.tok, RuleSet.from_pretrained(path), prompts, max_new_tokens, seed, backend)
    for mode, page_ids in pages.items():
        row[mode] = page_figures(judge.judge(prompts, page_ids, infos))
    return row


def compare(cfg, methods: dict[str, list[Path]], progress=None) -> dict:
    """Every method's checkpoints on the same held-out data (cfg: rl.config.CompareConfig).
    -> {"logging": page figures, "methods": aggregate(...), "per_checkpoint": ..., "budgets": ..., "rankings": ...}"""
    from homepage.dataset import open_stage_dataset
    from homepage.logs import sample_impressions
    from policies.wbc import wbc_data
    from rl.data import prompt_rows
    from rl.reward_manager import PageJudge

    first = next(iter(methods.values()))[0]
    judge = PageJudge.from_dirs(cfg.data_dir, cfg.environment, first, cfg.rm_dir, cfg.format_weight)
    tok = judge.tok
    _, table, report = open_stage_dataset(cfg, Path(cfg.out_dir))
    heldout = sample_impressions(table, "test", cfg.eval_users, cfg.contexts_seed)
    infos = [r["extra_info"] for r in prompt_rows(tok, heldout, "test")]
    prompts = [tok.encode_context(imp.context) for imp in heldout]
    valid = wbc_data(table, tok, "valid", "negative", 0.5)  # Table 1's labels: WBC's defaults, for every method
    valid = valid.subset(range(min(len(valid), cfg.eval_sequences)))
    logging = page_figures(judge.judge(prompts, [tok.encode_page(imp.page) for imp in heldout], infos))
    per_checkpoint: dict[str, list[dict]] = {}
    for name, paths in methods.items():
        for path in paths:
            if progress is not None:
                progress(name, path)
            per_checkpoint.setdefault(name, []).append(
                evaluate_checkpoint(path, judge, prompts, infos, valid, cfg.max_new_tokens, cfg.seed, cfg.eval_backend))
    aggregated = aggregate(per_checkpoint)
    return {"logging": logging, "methods": aggregated, "per_checkpoint": per_checkpoint,
            "budgets": {name: run_budget(paths[0]) for name, paths in methods.items()},
            "rankings": rankings(aggregated), "eval_contexts": len(prompts), "heldout_pages": len(valid),
            "bad_rows": report.bad_rows()}


def _cell(stat: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return ""
    scale, unit = (100.0, "%") if pct else (1.0, "")
    mean, std = stat["mean"] * scale, stat["std"] * scale
    sign = "+" if pct and mean >= 0 else ""
    return f"{sign}{mean:.{1 if pct else digits}f}{unit}" + (f" ± {std:.{1 if pct else digits}f}" if stat.get("per_seed") and len(stat["per_seed"]) > 1 else "")


def results_table(result: dict) -> str:
    """The comparison as one markdown table: a row per method (the logging policy first), mean ± std over seeds;
    violations are summed over seeds and both decodings (the logged pages' are those the logging policy wrote)."""
    head = ("| policy | seeds | entity AUC | row AUC | true greedy | gain | true sampled | gain | RM sampled | "
            "diversity | titles/page | violations |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    log = result["logging"]
    true = f"{log['true_reward']:.3f}" if log["true_reward"] is not None else ""
    lines = [head, f"| logging (logged pages) | | | | {true} | | | | {log['rm_reward']:.3f} | {log['diversity']:.3f} | "
                   f"{log['titles_per_page']:.1f} | {log['violations']} |"]
    for name, a in result["methods"].items():
        g, s = a.get("masked_greedy", {}), a.get("masked_sampled", {})
        violations = int(sum(sum(x["per_seed"]) for x in (g.get("violations"), s.get("violations")) if x))
        lines.append(f"| {name} | {a['checkpoints']} | {_cell(a.get('entity_auc'))} | {_cell(a.get('row_auc'))} | "
                     f"{_cell(g.get('true_reward'))} | {_cell(g.get('true_reward_gain'), pct=True)} | "
                     f"{_cell(s.get('true_reward'))} | {_cell(s.get('true_reward_gain'), pct=True)} | "
                     f"{_cell(s.get('rm_reward'))} | {_cell(s.get('diversity'))} | {_cell(s.get('titles_per_page'), 1)} | "
                     f"{violations} |")
    return "\n".join(lines) + "\n"
