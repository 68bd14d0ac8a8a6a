"""How far post-training can go: best-of-n curves under the reward model and under the truth, and a greedy page
builder that reads the truth.

For each held-out request, N pages are sampled from a policy under the rule masks, and every page is scored by
the reward model and by the environment's truth. Best-of-n picks, among n of them, the page a selector ranks
highest: by the reward model (what a deployment could do), or by the truth (what the policy's samples hold at
best). The reward model's belief about its own pick against the truth of that pick is reward-model
over-optimization in the sense of Gao et al., 2022, "Scaling Laws for Reward Model Overoptimization".

`best_of_n` is the unbiased estimator over all n-subsets of the N samples (not one random draw per n): the
k-th lowest page by the selector is the pick of an n-subset exactly when the subset holds it and n - 1 of the k
pages below it, so it is picked with probability C(k, n-1) / C(N, n).

`greedy_page` builds a page for one request token by token under the rule masks, each time adding the allowed
title whose page has the highest true reward, or, when no title raises it, opening the allowed row whose best
first title does; it stops when nothing raises the reward and the masks allow [EOP]. It knows each user's hidden
tastes, so no policy can reach it; it bounds what the rules allow.

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


def greedy_page(env, rules, tok, context, prompt: list[int]) -> tuple[list[int], list[tuple[float, bool]]]:
    """The ground-truth greedy page of one request (module docstring) under `rules`' masks.
    env: an environment (true_page_reward); tok: GenPageTokenizer; prompt: the context's ids.
    -> (page ids ending with [EOP] when the masks allowed it, per step (true reward after it, forced: the masks
    allowed no step that kept the reward and no [EOP]))"""
    from homepage.pages import Page, Row
    from policies.tokenizer import ENTITY_PREFIX, is_title_token

    titles = {i: t[len(ENTITY_PREFIX):] for i, t in enumerate(tok.tokens) if is_title_token(t)}
    row_ids = {i: t[len("row:"):] for i, t in enumerate(tok.tokens) if t.startswith("row:") and t[4:] in set(tok.row_ids)}
    prefix: list[int] = []
    rows: list[Row] = []
    value = float(env.true_page_reward([context], [Page(())])[0])
    trace: list[tuple[float, bool]] = []

    def best(candidates: list[tuple[list[int], Page]]):
        if not candidates:
            return None
        vals = env.true_page_reward([context] * len(candidates), [page for _, page in candidates])
        k = int(np.argmax(vals))
        return float(vals[k]), candidates[k][0], candidates[k][1]

    while True:
        allowed = np.flatnonzero(rules.allowed_step([prompt], [prefix])[0].numpy())
        step = None
        if rows:  # another title in the current row
            last = rows[-1]
            step = best([([i], Page(tuple(rows[:-1]) + (Row(last.row_id, last.entity_ids + (titles[i],)),)))
                         for i in allowed if i in titles])
        if step is None or step[0] <= value:  # no title raises the reward: open a row with its best first title
            opened = [r for r in allowed if r in row_ids]
            after = rules.allowed_step([prompt] * len(opened), [prefix + [r] for r in opened]).numpy() if opened else []
            row_step = best([([r, i], Page(tuple(rows) + (Row(row_ids[r], (titles[i],)),)))
                             for r, ok in zip(opened, after) for i in np.flatnonzero(ok) if i in titles])
            if row_step is not None and (step is None or row_step[0] > step[0]):
                step = row_step
        eop = tok.eop_id in allowed
        if step is None or (step[0] <= value and eop):
            if eop:
                prefix.append(tok.eop_id)
            return prefix, trace
        forced = step[0] <= value  # the masks allow neither [EOP] nor a step that raises the reward
        value, ids, page = step
        trace.append((value, forced))
        prefix += ids
        rows = list(page.rows)
