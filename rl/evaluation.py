"""Final evaluation of a Dr. GRPO run on held-out users: logging policy vs pretrained vs RL policy.

The pretrained and the RL policy are evaluated by verl's own validation pass on the held-out prompts (test-split
users), in the same vLLM server with the same rule masks and scored by the same reward manager (true reward only where an environment is configured): before the
first step (the pretrained policy: once per run, by the first seed that starts from it, since every seed starts
from the same policy) and after each seed's last step (the RL policy); verl writes one record per page to
`seed_<s>/validation/<step>.jsonl`. The logging policy's pages are the logged pages of the same held-out
impressions, scored by the same `PageJudge` (its recall on the same user's other logged page: the engaged
titles of a page are trivially on that page). Everything is averaged over pages, the RL policy's figures then over seeds.

Writes results.md (the table), curves.png (per-step reward and diversity relative to the pretrained policy =
1.0, KL to the reference) and returns the summary dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from policies.tokenizer import is_title_token
from rl import page_metrics as pm
from rl.config import DrGrpoConfig, RunPaths, final_step, pretrained_validation

POLICIES = ("logging", "pretrained", "rl")


def read_metrics(paths: RunPaths) -> dict[int, dict[str, float]]:
    """Per-step metrics of one seed from verl's file logger (later attempts override repeated steps)."""
    steps: dict[int, dict[str, float]] = {}
    files = sorted(paths.metrics.glob("attempt_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return steps


def read_validation(path: Path) -> dict[str, np.ndarray]:
    """verl's per-page validation dump -> {field: [N]} for the numeric fields, plus "output" (page text)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, np.ndarray] = {"output": np.array([r["output"] for r in rows], dtype=object)}
    for key in rows[0]:
        if isinstance(rows[0][key], (int, float)) and not isinstance(rows[0][key], bool):
            out[key] = np.array([r[key] for r in rows], dtype=np.float64)
    return out


def text_coverage(page_texts, n_entities: int) -> float:
    """Catalog coverage of pages given as token text (fallback tokens `ent:<...>` excluded)."""
    shown = {t for text in page_texts for t in str(text).split() if is_title_token(t)}
    return len(shown) / max(n_entities, 1)


def policy_row(values: dict[str, np.ndarray], n_entities: int) -> dict[str, float]:
    """Means over pages of what the table reports."""
    total = values.get(pm.EXTRA_VIOLATIONS_PREFIX + "total", np.zeros(1))

    def nanmean(key: str) -> float:
        v = np.asarray(values.get(key, [np.nan]), dtype=np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return {
        "true_reward": nanmean(pm.EXTRA_TRUE), "recall": nanmean(pm.EXTRA_RECALL),
        "rm_reward": float(np.mean(values[pm.EXTRA_RM])),
        "format_reward": float(np.mean(values[pm.EXTRA_FORMAT])), "diversity": float(np.mean(values[pm.EXTRA_DIVERSITY])),
        "titles_per_page": float(np.mean(values[pm.EXTRA_ENTITIES])),
        "coverage": text_coverage(values["output"], n_entities) if "output" in values else float("nan"),
        "mask_violations_per_page": float(np.mean(total)), "mask_violations": int(np.sum(total)),
        "pages": int(len(values[pm.EXTRA_RM])),
    }


def logging_policy_values(judge, data_dir: Path) -> dict[str, np.ndarray]:
    """The logged pages of the held-out impressions, scored by the judge; recall on the same user's other page."""
    import pyarrow.parquet as pq

    rows = pq.read_table(data_dir / "valid.parquet", columns=["prompt", "extra_info"]).to_pylist()
    tok = judge.tok
    infos = [r["extra_info"] for r in rows]
    prompts = [tok.encode_context(c) for c in _contexts(infos)]
    page_ids = [list(i["logged_page"]) for i in infos]
    j = judge.judge(prompts, page_ids, infos)
    has_other = [bool(i["other_page"]) for i in infos]
    other = judge.judge([p for p, h in zip(prompts, has_other) if h],
                        [list(i["other_page"]) for i in infos if i["other_page"]], [i for i in infos if i["other_page"]])
    recall = np.full(len(infos), np.nan)
    recall[np.flatnonzero(has_other)] = other.recall
    values = {pm.EXTRA_TRUE: j.true, pm.EXTRA_RECALL: recall, pm.EXTRA_RM: j.rm, pm.EXTRA_FORMAT: j.format,
              pm.EXTRA_DIVERSITY: j.diversity, pm.EXTRA_ENTITIES: j.n_entities,
              "output": np.array([" ".join(tok.tokens[t] for t in p) for p in page_ids], dtype=object)}
    values.update({pm.EXTRA_VIOLATIONS_PREFIX + r: v for r, v in j.violations.items()})
    return values


def _contexts(infos):
    from rl.data import contexts_from_extra_info

    return contexts_from_extra_info(infos)


def offline_vs_true(values: dict[str, np.ndarray]) -> float | None:
    """Pearson correlation of the engaged-title recall and the true reward over pages that have both."""
    recall, true = values.get(pm.EXTRA_RECALL), values.get(pm.EXTRA_TRUE)
    if recall is None or true is None:
        return None
    ok = np.isfinite(recall) & np.isfinite(true)
    return float(np.corrcoef(recall[ok], true[ok])[0, 1]) if ok.sum() > 2 else None


def results_table(rows: dict[str, dict[str, float]], seeds: list[int], users: int) -> str:
    """Markdown table of the policies on held-out users."""
    cols = [("true_reward", "true reward"), ("recall", "engaged recall"), ("rm_reward", "RM reward"), ("diversity", "diversity"),
            ("coverage", "catalog coverage"), ("titles_per_page", "titles/page"),
            ("mask_violations_per_page", "mask-rule violations/page")]
    has_truth = np.isfinite(rows["pretrained"]["true_reward"])
    if not has_truth:
        cols = cols[1:]
    key = "true_reward" if has_truth else "rm_reward"
    pre = rows["pretrained"][key]
    lines = [f"Held-out users: {users} logged test-split requests; pretrained: validated once (every seed starts from it); "
             f"RL: mean over seeds {seeds}; pages sampled at the evaluation temperature under the rule masks.", "",
             "| policy | " + " | ".join(c for _, c in cols) + f" | {key.replace('_', ' ')} vs pretrained |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for name in POLICIES:
        r = rows[name]
        cells = [f"{r[k]:.3f}" if k != "mask_violations_per_page" else f"{r[k]:.3g}" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r[key] / pre:.3f} |")
    return "\n".join(lines) + "\n"


VAL_KEYS = {pm.RM_REWARD: pm.EXTRA_RM, pm.TRUE_REWARD: pm.EXTRA_TRUE, pm.DIVERSITY: pm.EXTRA_DIVERSITY}


def val_metric(steps: dict[int, dict[str, float]], step: int, key: str) -> float | None:
    """verl's validation mean of a per-step metric's quantity at `step` (held-out users), if logged."""
    name = VAL_KEYS.get(key)
    return steps.get(step, {}).get(f"val-aux/genpage/{name}/mean@1") if name else None


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    out = np.convolve(y, np.ones(window), "valid") / window
    return np.concatenate([np.cumsum(y[: window - 1]) / np.arange(1, window), out]) if len(y) >= window else np.cumsum(y) / np.arange(1, len(y) + 1)


def plot_curves(per_seed: dict[int, dict[int, dict[str, float]]], path: Path, window: int = 5,
                pretrained_steps: dict[int, dict[str, float]] | None = None) -> None:
    """Per-step reward and diversity relative to the pretrained policy (= 1.0), and the KL to the reference.

    Each step's rollouts come from a different handful of users, so the curves are noisy: thin lines are the
    steps, thick ones their moving average over `window` steps (mean over seeds). The pretrained level is its
    validation on held-out users before step 1 (the seed's own, else `pretrained_steps`' step 0: it is validated
    once per run; step 1's rollouts if neither has it), and the dots at the end are the RL policy's validation on
    those same held-out users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward (pretrained = 1.0)", [(pm.RM_REWARD, "RM reward"), (pm.TRUE_REWARD, "true reward"),
                                              (pm.VALIDATOR_REWARD, "validator RM")], True),
              ("diversity (pretrained = 1.0)", [(pm.DIVERSITY, "diversity"), (pm.COVERAGE, "catalog coverage")], True),
              ("RM score minus (reward units)", [(pm.RM_TRUTH_GAP, "true reward"), (pm.RM_VALIDATOR_GAP, "validator RM")], False),
              ("KL to reference (actor/kl_loss)", [(pm.KL, "KL")], False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, series, relative) in zip(axes, panels):
        for (key, label), color in zip(series, ("tab:blue", "tab:orange", "tab:green")):
            curves, finals = [], []
            for seed, steps in sorted(per_seed.items()):
                xs = sorted(s for s in steps if s >= 1 and key in steps[s])
                if not xs:
                    continue
                ys = np.array([steps[s][key] for s in xs], dtype=float)
                base = 1.0
                if relative:
                    base = (val_metric(steps, 0, key) or val_metric(pretrained_steps or {}, 0, key)
                            or float(np.mean(ys[: min(3, len(ys))])) or 1.0)
                    final = val_metric(steps, xs[-1], key)
                    if final is not None:
                        finals.append((xs[-1], final / base))
                ax.plot(xs, ys / base, color=color, alpha=0.25, lw=0.8)
                curves.append((xs, ys / base))
            if curves:
                n = min(len(c[1]) for c in curves)
                ax.plot(curves[0][0][:n], moving_average(np.mean([c[1][:n] for c in curves], axis=0), window),
                        color=color, lw=2, label=label)
            for x, y in finals:
                ax.plot([x], [y], "o", color=color, ms=5)
        if relative:
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_step_gaps(per_seed: dict[int, dict[int, dict[str, float]]]) -> list[dict[str, float]]:
    """One row per step: {"step", metric: mean over the seeds that ran that step} for the RM gaps and the RM,
    validator and true reward of the rollouts."""
    keys = (pm.RM_TRUTH_GAP, pm.RM_VALIDATOR_GAP, pm.RM_REWARD, pm.TRUE_REWARD, pm.VALIDATOR_REWARD)
    out = []
    for step in sorted({s for steps in per_seed.values() for s in steps if s >= 1}):
        row = {k: float(np.mean(v)) for k in keys
               if (v := [steps[step][k] for steps in per_seed.values() if k in steps.get(step, {})])}
        if row:
            out.append({"step": step, **row})
    return out


def heldout_per_step(out: Path, seeds) -> list[dict[str, float]]:
    """One row per validated step: the held-out pages' mean RM and true reward, averaged over the seeds that
    validated at that step (step 0: the pretrained policy, validated once)."""
    by_step: dict[int, list[dict[str, float]]] = {}
    for seed in seeds:
        for path in (RunPaths(out, seed).run / "validation").glob("*.jsonl"):
            v = read_validation(path)
            by_step.setdefault(int(path.stem), []).append(
                {"rm_reward": float(np.mean(v[pm.EXTRA_RM])),
                 "true_reward": float(np.nanmean(v[pm.EXTRA_TRUE])) if np.isfinite(v.get(pm.EXTRA_TRUE, [np.nan])).any() else float("nan")})
    return [{"step": step, "seeds": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
            for step, rows in sorted(by_step.items())]


def evaluate_run(cfg: DrGrpoConfig, out: Path, init: Path) -> dict:
    """Table, curves and summary of a finished run (all seeds trained)."""
    from rl.reward_manager import PageJudge

    out = Path(out)
    judge = PageJudge.from_dirs(cfg.data_dir, cfg.environment, init, cfg.rm_dir, cfg.format_weight,
                                ensemble=cfg.rm_ensemble, ensemble_k=cfg.rm_ensemble_k)  # the RM the policy was trained on
    n_entities = len(judge.entity_ids)
    pretrained = pretrained_validation(out, cfg.seeds)  # one validation of the pretrained policy per run
    if pretrained is None:
        raise RuntimeError(f"{out}: no seed holds the step-0 (pretrained) validation dump (seed_<s>/validation/0.jsonl); "
                           "rerun with --force")
    pre_seed, pre_path = pretrained
    pre_values = read_validation(pre_path)
    pre_row = policy_row(pre_values, n_entities)
    per_seed_metrics, rl_rows = {}, []
    for seed in cfg.seeds:
        paths = RunPaths(out, seed)
        per_seed_metrics[seed] = read_metrics(paths)
        steps = sorted(int(p.stem) for p in (paths.run / "validation").glob("*.jsonl") if int(p.stem) > 0)
        if not steps:
            raise RuntimeError(f"{paths.run / 'validation'}: no validation dump after training; rerun with --force")
        rl_values = read_validation(paths.run / "validation" / f"{steps[-1]}.jsonl")
        rl_rows.append(policy_row(rl_values, n_entities))
    rows = {"logging": policy_row(logging_policy_values(judge, out / "data"), n_entities), "pretrained": pre_row,
            "rl": {k: float(np.mean([r[k] for r in rl_rows])) for k in rl_rows[0]}}
    rows["rl"]["mask_violations"] = int(sum(r["mask_violations"] for r in rl_rows))
    (out / "results.md").write_text("# Dr. GRPO: held-out evaluation\n\n" + results_table(rows, list(cfg.seeds), cfg.eval_users))
    plot_curves(per_seed_metrics, out / "curves.png", pretrained_steps=per_seed_metrics[pre_seed])

    all_steps = [m for steps in per_seed_metrics.values() for m in steps.values()]
    diffs = [m[pm.ROLLOUT_PROBS_DIFF_MAX] for m in all_steps if pm.ROLLOUT_PROBS_DIFF_MAX in m]
    step_times = [m["timing_s/step"] for m in all_steps if "timing_s/step" in m]
    pre, rl = rows["pretrained"], rows["rl"]
    truth = {}
    if judge.env is not None:  # true_* figures exist only with an environment
        seed_gains = [r["true_reward"] / pre["true_reward"] - 1.0 for r in rl_rows]
        truth = {
            "true_reward_logging": rows["logging"]["true_reward"],
            "true_reward_pretrained": pre["true_reward"],
            "true_reward_rl": rl["true_reward"],
            "true_reward_gain": rl["true_reward"] / pre["true_reward"] - 1.0,
            "true_reward_gain_per_seed": seed_gains,  # the spread over seeds
            "true_reward_gain_std": float(np.std(seed_gains, ddof=1)) if len(seed_gains) > 1 else None,
            # how far the offline metric stands in for the truth: per page, within a policy's held-out pages
            # (rl: the last seed's)
            "recall_true_pearson": {name: offline_vs_true(v) for name, v in
                                    (("pretrained", pre_values), ("rl", rl_values))},
        }
    return {
        **truth,
        "recall_logging": rows["logging"]["recall"],
        "recall_pretrained": pre["recall"],
        "recall_rl": rl["recall"],
        "environment": type(judge.env).__name__ if judge.env is not None else None,
        "rm_reward_logging": rows["logging"]["rm_reward"],
        "rm_reward_pretrained": pre["rm_reward"],
        "rm_reward_rl": rl["rm_reward"],
        "diversity_logging": rows["logging"]["diversity"],
        "diversity_pretrained": pre["diversity"],
        "diversity_rl": rl["diversity"],
        "coverage_pretrained": pre["coverage"],
        "coverage_rl": rl["coverage"],
        "mask_violations": rl["mask_violations"],
        "mask_violations_pretrained": pre["mask_violations"],
        "rollout_probs_diff_max": float(max(diffs)) if diffs else None,
        "step_time_s_mean": float(np.mean(step_times)) if step_times else None,
        "seeds": list(cfg.seeds),
        "steps_per_seed": {str(s): final_step(cfg, RunPaths(out, s)) for s in cfg.seeds},  # < steps where stopped early
        # per step, mean over seeds: RM score minus the truth / the validator on the rollouts (over-optimization)
        "gap_per_step": per_step_gaps(per_seed_metrics),
        "heldout_per_step": heldout_per_step(out, cfg.seeds),  # every held-out validation (test_freq), mean over seeds
        "per_seed": {str(s): {"pretrained": pre, "rl": r} for s, r in zip(cfg.seeds, rl_rows)},
        "pretrained_validation_seed": pre_seed,  # the seed session that validated the pretrained policy (once per run)
        "table": rows,
        "eval_users": cfg.eval_users,
    }
