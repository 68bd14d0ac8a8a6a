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
    context's tokens (profile, request, history titles) and a bias, w = argmin |Xw - y|^2 + lambda |w|^2 (the bias
    not penalized). X is sparse (each row holds its sequence's ~100 tokens of 2V + 1 columns): solved in closed
    form when the dense X fits `dense_cells` (the toy world), else by conjugate gradients on the normal
    equations with sparse products, never forming X^T X ((2V)^2: 13 GB at V = 20,000)."""

    def __init__(self, tok: GenPageTokenizer, ridge_lambda: float, dense_cells: int = 50_000_000,
                 tol: float = 1e-10, max_iter: int = 1000):
        self.V, self.ridge_lambda = len(tok), ridge_lambda
        self.page_token = (tok.token_kind == KIND_ENTITY) | (tok.token_kind == KIND_ROW)  # [V]
        self.dense_cells, self.tol, self.max_iter = dense_cells, tol, max_iter
        self.w: np.ndarray | None = None
        self.solver: dict = {}  # how the last fit was solved: method, iterations, relative residual

    @property
    def n_features(self) -> int:
        return 2 * self.V + 1

    def sparse_features(self, prompts, pages) -> tuple[np.ndarray, np.ndarray]:
        """X as (row, column) pairs, one per token (a token twice in a sequence counts 2): the page's entity and
        row tokens at their id, the context's tokens at V + id, the bias at 2V.  -> (rows [E], cols [E])"""
        from policies.data import TokenLists

        pg = pages if isinstance(pages, TokenLists) else TokenLists.from_lists(pages)
        pr = prompts if isinstance(prompts, TokenLists) else TokenLists.from_lists(prompts)
        page_rows, page_vals = pg.flat()
        keep = self.page_token[page_vals]
        prompt_rows, prompt_vals = pr.flat()
        n = len(pg)
        rows = np.concatenate([page_rows[keep], prompt_rows, np.arange(n)])
        cols = np.concatenate([page_vals[keep], self.V + prompt_vals, np.full(n, 2 * self.V)])
        return rows.astype(np.int32), cols.astype(np.int32)  # int32: half the memory of 100 tokens per row

    def features(self, prompts, pages) -> np.ndarray:
        """The dense X [N, 2V + 1]: page token counts, context token counts, 1."""
        rows, cols = self.sparse_features(prompts, pages)
        X = np.zeros((len(pages), self.n_features))
        np.add.at(X, (rows, cols), 1.0)
        return X

    def fit(self, prompts, pages, page_reward: np.ndarray) -> "BagOfEntitiesRidge":
        y = np.asarray(page_reward, np.float64)
        penalty = np.full(self.n_features, self.ridge_lambda)
        penalty[-1] = 0.0
        if len(y) * self.n_features <= self.dense_cells:
            X = self.features(prompts, pages)
            self.w = np.linalg.solve(X.T @ X + np.diag(penalty), X.T @ y)
            self.solver = {"method": "closed_form"}
            return self
        rows, cols = self.sparse_features(prompts, pages)
        D, N = self.n_features, len(y)
        Xv = lambda v: np.bincount(rows, weights=v[cols], minlength=N)  # noqa: E731  [D] -> [N]
        XTu = lambda u: np.bincount(cols, weights=u[rows], minlength=D)  # noqa: E731  [N] -> [D]
        A = lambda v: XTu(Xv(v)) + penalty * v  # noqa: E731  (X^T X + diag(penalty)) v
        # Jacobi preconditioner: the diagonal of X^T X with each token's entries counted once (any positive
        # diagonal is valid; this one is exact where no token repeats within a sequence)
        M = 1.0 / np.maximum(np.bincount(cols, minlength=D) + penalty, 1e-12)
        b = XTu(y)
        w, r = np.zeros(D), b.copy()
        z = M * r
        d, rz, norm_b = z.copy(), r @ z, np.linalg.norm(b) or 1.0
        it = 0
        for it in range(1, self.max_iter + 1):
            Ad = A(d)
            alpha = rz / (d @ Ad)
            w += alpha * d
            r -= alpha * Ad
            if np.linalg.norm(r) <= self.tol * norm_b:
                break
            z = M * r
            rz, rz_old = r @ z, rz
            d = z + (rz / rz_old) * d
        self.w = w
        self.solver = {"method": "conjugate_gradient", "iterations": it,
                       "relative_residual": float(np.linalg.norm(b - A(w)) / norm_b)}
        return self

    def predict(self, prompts, pages) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("fit the baseline first")
        rows, cols = self.sparse_features(prompts, pages)
        return np.bincount(rows, weights=self.w[cols], minlength=len(pages))


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
