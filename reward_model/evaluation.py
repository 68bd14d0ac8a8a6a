"""Judging a reward model: against observed page rewards (MSE, Pearson, Spearman), against an environment's ground
truth (Pearson with the exact expected page reward, pairwise ordering of two pages under one context), and
the baselines it must beat (the mean; a bag-of-entities ridge regression)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from policies.tokenizer import KIND_ENTITY, KIND_ROW, GenPageTokenizer


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (a constant predictor ranks nothing)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx ** 2).sum() * (dy ** 2).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else 0.0


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata).  [N] -> [N]"""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # start of each run of equal values
    run = np.cumsum(first) - 1  # [N] run index in sorted order
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    out = np.empty(len(x))
    out[order] = avg[run]
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def pairwise_accuracy(pred_a: np.ndarray, pred_b: np.ndarray, true_a: np.ndarray, true_b: np.ndarray,
                      tie: float = 1e-9) -> tuple[float, int]:
    """Share of pairs the prediction orders as the ground truth does. Pairs tied in the ground truth
    (|true_a - true_b| <= tie, e.g. two identical pages) are left out; a predicted tie counts half.
    All inputs [P].  -> (accuracy, pairs counted)"""
    dt = np.asarray(true_a) - np.asarray(true_b)
    dp = np.asarray(pred_a) - np.asarray(pred_b)
    keep = np.abs(dt) > tie
    if not keep.any():
        return float("nan"), 0
    agree = np.where(dp[keep] == 0, 0.5, (np.sign(dp[keep]) == np.sign(dt[keep])).astype(np.float64))
    return float(agree.mean()), int(keep.sum())


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p over n pairs taken as independent (pairs of one user share pages, so
    this is a lower bound); nan without pairs."""
    return float(np.sqrt(p * (1.0 - p) / n)) if n > 0 else float("nan")


def regression_metrics(pred: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """Predicted vs observed page rewards (reward units)."""
    return {"mse": float(np.mean((pred - observed) ** 2)), "pearson_observed": pearson(pred, observed),
            "spearman_observed": spearman(pred, observed)}


class BagOfEntitiesRidge:
    """Linear baseline: page reward ~ counts of the page's entity and row tokens plus counts of the
    context's tokens (profile, request, history titles) and a bias, fitted in closed form
    (w = (X^T X + lambda I)^-1 X^T y, the bias not penalized)."""

    def __init__(self, tok: GenPageTokenizer, ridge_lambda: float):
        self.V, self.ridge_lambda = len(tok), ridge_lambda
        self.page_token = (tok.token_kind == KIND_ENTITY) | (tok.token_kind == KIND_ROW)  # [V]
        self.w: np.ndarray | None = None

    def features(self, prompts: list[list[int]], pages: list[list[int]]) -> np.ndarray:
        """[N, 2V + 1]: page token counts, context token counts, 1."""
        X = np.zeros((len(pages), 2 * self.V + 1))
        for i, (p, g) in enumerate(zip(prompts, pages)):
            g = np.asarray(g, dtype=np.int64)
            np.add.at(X[i], g[self.page_token[g]], 1.0)
            np.add.at(X[i], self.V + np.asarray(p, dtype=np.int64), 1.0)
        X[:, -1] = 1.0
        return X

    def fit(self, prompts: list[list[int]], pages: list[list[int]], page_reward: np.ndarray) -> "BagOfEntitiesRidge":
        X = self.features(prompts, pages)
        penalty = np.full(X.shape[1], self.ridge_lambda)
        penalty[-1] = 0.0
        self.w = np.linalg.solve(X.T @ X + np.diag(penalty), X.T @ np.asarray(page_reward, np.float64))
        return self

    def predict(self, prompts: list[list[int]], pages: list[list[int]]) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("fit the baseline first")
        return self.features(prompts, pages) @ self.w


def scatter_plot(path: Path, pred: dict[str, np.ndarray], observed: np.ndarray, title: str) -> None:
    """Predicted vs observed page reward on validation, one panel per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pred), figsize=(4.2 * len(pred), 4.2), squeeze=False)
    lo, hi = float(np.min(observed)), float(np.max(observed))
    for ax, (name, p) in zip(axes[0], pred.items()):
        ax.scatter(observed, p, s=4, alpha=0.3)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set_xlabel("observed page reward")
        ax.set_ylabel("predicted page reward")
        ax.set_title(f"{name}: r = {pearson(p, observed):.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(summary: dict) -> str:
    """The markdown table of results.md: each metric for the reward model, its scratch ablation and the
    baselines (missing cells: not applicable or not computed)."""
    def cell(key: str) -> str:
        v = summary.get(key)
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [
        ("MSE vs observed (lower is better)", "mse"), ("Pearson vs observed", "pearson_observed"),
        ("Spearman vs observed", "spearman_observed"), ("GT Pearson, logged pages", "gt_pearson_logged"),
        ("GT pairwise acc., logged pages", "gt_pairwise_acc_logged"),
        ("GT Pearson, generated pages", "gt_pearson_generated"),
        ("GT pairwise acc., generated pages", "gt_pairwise_acc_generated"),
    ]
    lines = ["| metric | RM (pretrained init) | RM (random init) | mean baseline | bag-of-entities ridge |",
             "|---|---|---|---|---|"]
    for label, key in rows:
        if all(summary.get(p + key) is None for p in ("", "scratch_", "baseline_mean_", "baseline_linear_")):
            continue  # e.g. the ground-truth rows without an environment
        lines.append(f"| {label} | {cell(key)} | {cell('scratch_' + key)} | {cell('baseline_mean_' + key)} "
                     f"| {cell('baseline_linear_' + key)} |")
    se = [f"{what} pages +-{summary[f'gt_pairwise_acc_{what}_se']:.3f} ({summary[f'gt_pairs_{what}']} pairs)"
          for what in ("logged", "generated") if summary.get(f"gt_pairwise_acc_{what}_se") is not None]
    if se:
        lines += ["", "Standard error of the RM's pairwise accuracies (binomial, pairs taken as independent): "
                  + ", ".join(se) + "."]
    return "\n".join(lines) + "\n"


@dataclass
class EvalSet:
    """Held-out (validation-user) impressions and the ground truth a reward model is judged on.

    prompts, pages: [N] logged impressions; observed: [N] their logged page reward.
    true: [N] exact expected reward of each logged page under its own context (None without an environment).
    pair_a, pair_b: [P] indices of two logged pages of one user (data.same_user_pairs), both scored under
        impression a's context; true_b: [P] expected reward of page b under that context.
    gen_prompts, gen_pages: [2G] pages the pretrained policy generated, two per context (2g and 2g + 1);
        true_gen: [2G] their expected reward. Empty when generation was skipped.
    """

    prompts: list[list[int]]
    pages: list[list[int]]
    observed: np.ndarray
    true: np.ndarray | None = None
    pair_a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pair_b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    true_b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gen_prompts: list[list[int]] = field(default_factory=list)
    gen_pages: list[list[int]] = field(default_factory=list)
    true_gen: np.ndarray = field(default_factory=lambda: np.zeros(0))


def logged_eval_set(env, table, seqs) -> EvalSet:
    """EvalSet of logged impressions (table rows aligned with seqs) with an environment's ground truth
    (homepage.environment.Environment): each logged page, and for same-user pairs the other page in this context."""
    from homepage.logs import iter_impressions
    from reward_model.data import same_user_pairs

    imps = list(iter_impressions(table))
    contexts, pages = [i.context for i in imps], [i.page for i in imps]
    a, b = same_user_pairs(seqs.user_ids)
    true = env.true_page_reward(contexts, pages)
    true_b = env.true_page_reward([contexts[i] for i in a], [pages[i] for i in b]) if len(a) else np.zeros(0)
    return EvalSet(seqs.prompts, seqs.pages, seqs.page_reward.astype(np.float64), true, a, b, true_b)


def evaluate(score: Callable[[list[list[int]], list[list[int]]], np.ndarray], es: EvalSet,
             pred: np.ndarray | None = None) -> dict[str, float | int]:
    """All metrics of one scorer ((prompts, pages) -> page rewards [N]) on an EvalSet. pred: the scorer's [N]
    predictions on es.prompts, es.pages when the caller has them already (they are not computed again)."""
    if pred is None:
        pred = score(es.prompts, es.pages)  # [N]
    out: dict[str, float | int] = regression_metrics(pred, es.observed)
    out["pred_mean_logged"] = float(pred.mean())
    if es.true is not None:
        out["gt_pearson_logged"] = pearson(pred, es.true)
        if len(es.pair_a):
            pred_b = score([es.prompts[i] for i in es.pair_a], [es.pages[i] for i in es.pair_b])  # [P]
            out["gt_pairwise_acc_logged"], out["gt_pairs_logged"] = pairwise_accuracy(
                pred[es.pair_a], pred_b, es.true[es.pair_a], es.true_b)
            out["gt_pairwise_acc_logged_se"] = binomial_se(out["gt_pairwise_acc_logged"], out["gt_pairs_logged"])
    if es.gen_pages:
        gen = score(es.gen_prompts, es.gen_pages)  # [2G]
        out["gt_pearson_generated"] = pearson(gen, es.true_gen)
        out["gt_pairwise_acc_generated"], out["gt_pairs_generated"] = pairwise_accuracy(
            gen[0::2], gen[1::2], es.true_gen[0::2], es.true_gen[1::2])
        out["gt_pairwise_acc_generated_se"] = binomial_se(out["gt_pairwise_acc_generated"], out["gt_pairs_generated"])
        out["pred_mean_generated"] = float(gen.mean())
    return out
