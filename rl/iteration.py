"""Iterated rounds of post-training, the way production RLHF is run (recipes/iterate.py).

Round 1 is a Dr. GRPO run on the dataset's own logs and reward model (the demo's `runs/dr_grpo`). Each later
round r, for each seed's chain on its own (a seed is one replicate of the whole procedure):

1. serve: the chain's round r-1 policy writes a page, under the business-rule masks, for each of fresh requests
   of train-split users; a share of the requests is served at a hotter temperature, as the logging policy
   explores (`served_pages`);
2. log: the environment's users browse the pages and the outcomes become a log part in the dataset's own schema
   (`homepage.environment.log_impressions`; the simulator can, a team serves the policy online instead);
3. data: a dataset directory holding the original logs and every part the chain has logged so far, as links
   (`link_dataset`); held-out users never get a served page, so every round is judged on the same contexts;
4. reward model: `recipes/train_rm.py` on all those logs;
5. RL: `recipes/dr_grpo.py` from the round r-1 policy (its KL reference too) on the new reward model.

Per round the figures come from each run's own summary (`round_figures`): the held-out true reward of the
chain's policy and its gain over the pretrained policy, the reward model's score of the same pages and the gap
to the truth, diversity and rule violations, plus what the served pages earned in the world.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURES = ("true_reward", "rm_reward", "rm_truth_gap", "diversity", "titles_per_page", "mask_violations")


def link_dataset(base: str | Path, parts: list[Path], out: str | Path) -> Path:
    """A dataset directory at `out`: everything of `base` linked, its logs/ holding links to base's log parts
    followed by `parts` (named so they sort after base's: readers concatenate parts in name order, so the
    base rows, held-out ones included, keep their positions)."""
    base, out = Path(base).resolve(), Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():
        if entry.name in ("logs", "summary.json") or entry.name.startswith("."):
            continue
        link = out / entry.name
        if not link.is_symlink():
            link.symlink_to(entry)
    wanted = {p.name: p.resolve() for p in sorted((base / "logs").glob("*.parquet"))}
    clash = sorted(wanted.keys() & {p.name for p in parts})
    if clash:
        raise ValueError(f"new log parts {clash} have the names of {base / 'logs'}'s parts")
    wanted.update({p.name: Path(p).resolve() for p in parts})
    for link in (out / "logs").iterdir():  # a rerun with fewer parts
        if link.name not in wanted:
            link.unlink()
    for name, target in wanted.items():
        link = out / "logs" / name
        if not link.is_symlink():
            link.symlink_to(target)
    return out


def explore_mask(n: int, explore_fraction: float, seed: int) -> np.ndarray:
    """[n] bool: which requests are served at the exploration temperature (exactly round(n * fraction) of them,
    drawn with `seed`)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 31]).permutation(n)[: int(round(n * explore_fraction))]] = True
    return mask


def served_pages(policy_dir: str | Path, prompts: list[list[int]], explore: np.ndarray, temperature: float,
                 explore_temperature: float, max_new_tokens: int, eop_id: int, seed: int) -> list[list[int]]:
    """One page (token ids) per prompt from the policy served by vLLM under its saved rule masks: sampled at
    `temperature`, the `explore` requests at `explore_temperature`."""
    from policies import vllm_engine

    llm = vllm_engine.make_llm(policy_dir, seed=seed)
    pages: list[list[int] | None] = [None] * len(prompts)
    for mask, temp in ((~explore, temperature), (explore, explore_temperature)):
        idx = np.flatnonzero(mask)
        if len(idx):
            out = vllm_engine.generate(llm, [prompts[i] for i in idx], temp, max_new_tokens, eop_id)
            for i, samples in zip(idx, out):
                pages[i] = samples[0]["token_ids"]
    del llm
    return pages  # type: ignore[return-value]


def serve_round(policy_dir: str | Path, env, n: int, seed: int, first_id: int, policy_name: str,
                temperature: float, explore_fraction: float, explore_temperature: float, max_new_tokens: int):
    """Steps 1 and 2 of a round: -> (log table, figures). A page that is not whole (no [EOP], a fallback token,
    a row without titles, no row at all) is not served: it is counted in the figures by reason."""
    from homepage.environment import log_impressions, sample_contexts
    from policies.evaluation import pages_from_tokens
    from policies.tokenizer import GenPageTokenizer

    tok = GenPageTokenizer.from_pretrained(policy_dir)
    contexts = sample_contexts(env, n, "train", seed)
    if contexts is None:
        raise ValueError("serving a policy needs an environment that samples contexts (homepage.environment)")
    explore = explore_mask(n, explore_fraction, seed)
    ids = served_pages(policy_dir, [tok.encode_context(c) for c in contexts], explore, temperature,
                       explore_temperature, max_new_tokens, tok.eop_id, seed)
    keep, pages, reasons = [], [], dict.fromkeys(("without_eop", "fallback_entities", "fallback_rows", "empty_rows",
                                                  "no_rows"), 0)
    for b, page_ids in enumerate(ids):
        (page,), report = pages_from_tokens(tok, [page_ids])
        faults = {"without_eop": report.without_eop, "fallback_entities": report.fallback_entities,
                  "fallback_rows": report.fallback_rows, "empty_rows": report.empty_rows, "no_rows": int(not page.rows)}
        for reason, count in faults.items():
            reasons[reason] += count
        if not any(faults.values()):
            keep.append(b)
            pages.append(page)
    kept = [contexts[b] for b in keep]
    table = log_impressions(env, kept, pages, np.random.default_rng([seed, 37]), first_id, policy_name)
    if table is None:
        raise ValueError(f"the environment {type(env).__name__} cannot log served pages (no log_impressions method): "
                         "serve the policy online and add its logs to the dataset directory instead")
    true = env.true_page_reward(kept, pages)
    explored = explore[keep]
    figures = {
        "requests": n, "served": len(keep), "not_served": n - len(keep), "not_served_reasons": reasons,
        "explored": int(explored.sum()),
        "true_reward": float(true.mean()),  # what the served pages are worth (an A/B test would estimate it)
        "observed_reward": float(table.column("page_reward").to_numpy().mean()),  # what the log recorded
        "true_reward_exploit": float(true[~explored].mean()) if (~explored).any() else None,
        "true_reward_explore": float(true[explored].mean()) if explored.any() else None,
        "titles_per_page": float(np.mean([len(p.entity_ids) for p in pages])),
    }
    return table, figures


def round_figures(summary: dict, seed: int) -> dict:
    """One chain's figures of one round from its Dr. GRPO run's summary.json (rl.evaluation.evaluate_run): the
    held-out pages of the round's start and end policy ("start", "end": FIGURES), the steps it ran and the
    rollouts' RM-truth gap at its first and last step."""
    per_seed = summary["per_seed"][str(seed)]

    def row(policy: dict) -> dict:
        out = {k: policy[k] for k in FIGURES if k in policy}
        out["rm_truth_gap"] = policy["rm_reward"] - policy["true_reward"]
        return out

    gaps = [g["rollout/rm_truth_gap"] for g in summary.get("gap_per_step", []) if "rollout/rm_truth_gap" in g]
    return {"start": row(per_seed["pretrained"]), "end": row(per_seed["rl"]),
            "steps": summary["steps_per_seed"][str(seed)],
            "rollout_rm_truth_gap_first": gaps[0] if gaps else None,
            "rollout_rm_truth_gap_last": gaps[-1] if gaps else None}


def spread(values: list[float]) -> dict:
    """mean, standard deviation (ddof 1; None for one value) and the values."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "values": v}


def aggregate(rounds: dict[int, dict[int, dict]], pretrained_true: float) -> list[dict]:
    """rounds: {round: {seed: figures}} (figures: round_figures plus optional "served" and "rm") -> one row per
    round: mean and spread over the seeds of each end-of-round figure, the gain in true reward over the
    pretrained policy, and what the served pages and the round's reward model measured."""
    out = []
    for r in sorted(rounds):
        by_seed = rounds[r]
        row = {"round": r, "seeds": sorted(by_seed)}
        for k in FIGURES:
            vals = [f["end"][k] for f in by_seed.values() if k in f["end"]]
            if vals:
                row[k] = spread(vals)
        row["true_reward_gain"] = spread([f["end"]["true_reward"] / pretrained_true - 1.0 for f in by_seed.values()])
        row["steps"] = spread([f["steps"] for f in by_seed.values()])
        for part, keys in (("served", ("true_reward", "observed_reward", "served", "not_served")),
                           ("rm", ("gt_pairwise_acc_logged",))):
            got = [f[part] for f in by_seed.values() if f.get(part)]
            for k in keys:
                vals = [g[k] for g in got if g.get(k) is not None]
                if vals:
                    row[f"{part}_{k}"] = spread(vals)
        out.append(row)
    return out


def results_table(rows: list[dict], pretrained_true: float, logging_true: float | None) -> str:
    """The rounds as one markdown table (mean ± std over the chains' seeds)."""
    def cell(row: dict, key: str, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        if key not in row:
            return ""
        m, sd = row[key]["mean"] * scale, row[key]["std"]
        return fmt.format(m) + (f" ± {fmt.replace('+', '').format(sd * scale)}" if sd is not None else "")

    lines = ["| round | steps | true reward | gain | RM reward | RM - truth | diversity | titles/page | violations "
             "| served pages (true) | RM GT pair acc. |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if logging_true is not None:
        lines.append(f"| logging policy | | {logging_true:.3f} | | | | | | | | |")
    lines.append(f"| pretrained | | {pretrained_true:.3f} | | | | | | | | |")
    for row in rows:
        lines.append(" | ".join([
            f"| {row['round']}", cell(row, "steps", "{:.0f}"), cell(row, "true_reward"),
            cell(row, "true_reward_gain", "{:+.1f}%", 100.0), cell(row, "rm_reward"), cell(row, "rm_truth_gap"),
            cell(row, "diversity"), cell(row, "titles_per_page", "{:.1f}"), cell(row, "mask_violations", "{:.0f}"),
            cell(row, "served_true_reward"), cell(row, "rm_gt_pairwise_acc_logged")]) + " |")
    return "\n".join(lines) + "\n"


def plot_rounds(rounds: dict[int, dict[int, dict]], pretrained_true: float, path: str | Path) -> None:
    """Per chain: the held-out true reward and the RM's score of its policy after each round (round 0: the
    pretrained policy), and the RM-truth gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(10, 4))
    seeds = sorted({s for by_seed in rounds.values() for s in by_seed})
    for i, seed in enumerate(seeds):
        rs = [r for r in sorted(rounds) if seed in rounds[r]]
        color = f"C{i}"
        ax.plot([0, *rs], [pretrained_true, *(rounds[r][seed]["end"]["true_reward"] for r in rs)], "o-", color=color,
                label=f"seed {seed}: truth")
        ax.plot(rs, [rounds[r][seed]["end"]["rm_reward"] for r in rs], "x--", color=color, label=f"seed {seed}: its RM")
        gap.plot(rs, [rounds[r][seed]["end"]["rm_truth_gap"] for r in rs], "o-", color=color, label=f"seed {seed}")
    ax.set(xlabel="round", ylabel="held-out page reward", title="policy after each round")
    gap.set(xlabel="round", ylabel="RM score - true reward", title="the round's RM on its policy's pages")
    gap.axhline(0.0, color="grey", lw=0.5)
    for a in (ax, gap):
        a.set_xticks(range(0, max(rounds) + 1))
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
