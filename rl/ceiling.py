"""How far post-training can go: best-of-n curves under the reward model and under the truth.

For each held-out request, N pages are sampled from a policy under the rule masks, and every page is scored by
the reward model and by the environment's truth. Best-of-n picks, among n of them, the page a selector ranks
highest: by the reward model (what a deployment could do), or by the truth (what the policy's samples hold at
best). The reward model's belief about its own pick against the truth of that pick is reward-model
over-optimization in the sense of Gao et al., 2022, "Scaling Laws for Reward Model Overoptimization".

`best_of_n` is the unbiased estimator over all n-subsets of the N samples (not one random draw per n): the
k-th lowest page by the selector is the pick of an n-subset exactly when the subset holds it and n - 1 of the k
pages below it, so it is picked with probability C(k, n-1) / C(N, n).

Shapes: R requests, N samples per request.
"""

from __future__ import annotations

from math import comb

import numpy as np


def best_of_n(selector: np.ndarray, value: np.ndarray, ns) -> np.ndarray:
    """Mean over requests of the expected `value` of the page `selector` ranks highest among n of the N samples
    (drawn without replacement), for each n in ns.  selector, value [R, N] -> [len(ns)]"""
    selector, value = np.asarray(selector, dtype=np.float64), np.asarray(value, dtype=np.float64)
    R, N = selector.shape
    order = np.argsort(selector, axis=1, kind="stable")  # [R, N] ascending: ties go to the later sample
    ranked = np.take_along_axis(value, order, axis=1)  # [R, N] values by selector rank
    out = []
    for n in ns:
        if not 1 <= n <= N:
            raise ValueError(f"n={n} is outside 1..{N} (the samples per request)")
        weight = np.array([comb(k, n - 1) for k in range(N)], dtype=np.float64) / comb(N, n)  # [N], sums to 1
        out.append(float((ranked @ weight).mean()))
    return np.array(out)


def within_request_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over requests of the Pearson correlation of a and b across each request's samples (requests where
    either is constant are left out).  a, b [R, N] -> scalar"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    ok = den > 0
    return float(((a * b).sum(1)[ok] / den[ok]).mean()) if ok.any() else float("nan")


def sample_and_judge(policy_dir, judge, prompts: list[list[int]], infos: list[dict], n: int, max_new_tokens: int,
                     seed: int) -> dict[str, np.ndarray]:
    """n masked pages at temperature 1 per prompt from the policy (vLLM), each judged.
    -> {"rm", "true", "violations"}: [R, n] arrays"""
    from policies import vllm_engine

    llm = vllm_engine.make_llm(policy_dir, seed=seed)
    samples = vllm_engine.generate(llm, prompts, 1.0, max_new_tokens, judge.tok.eop_id, n=n)
    del llm
    flat = [s["token_ids"] for per_prompt in samples for s in per_prompt]
    j = judge.judge([p for p in prompts for _ in range(n)], flat, [i for i in infos for _ in range(n)])
    violations = np.sum([v for v in j.violations.values()], axis=0) if j.violations else np.zeros(len(flat))
    return {"rm": j.rm.reshape(len(prompts), n), "true": j.true.reshape(len(prompts), n),
            "violations": np.asarray(violations).reshape(len(prompts), n)}


def curves(scores: dict[str, np.ndarray], ns) -> dict[str, list[float]]:
    """The best-of-n curves of one policy's judged samples: the truth and the RM belief of the RM's pick, and
    the truth of the truth's pick."""
    rm, true = scores["rm"], scores["true"]
    return {"n": list(ns), "rm_pick_true": best_of_n(rm, true, ns).tolist(),
            "rm_pick_rm": best_of_n(rm, rm, ns).tolist(), "true_pick_true": best_of_n(true, true, ns).tolist(),
            "rm_true_pearson_within_request": within_request_pearson(rm, true)}
