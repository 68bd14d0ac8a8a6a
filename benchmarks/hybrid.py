"""Benchmark: hybrid row decoding vs full autoregressive decoding (paper section 6.4), on vLLM and HF.

    python benchmarks/hybrid.py [--model runs/pretrain/model] [--users 500] [--k 0 1 2] [--fill-row-len 5]

Greedy pages (deterministic, so the comparison is paired) for held-out users under the rule masks: decode
steps per page (model forward passes that wrote it), wall time per page at batch 1 (latency, median over
single-user calls) and at batch 256 (throughput; timings interleaved across configurations), rule violations, and the true expected page reward from
the world's ground truth, relative to autoregressive decoding. Headline: k = --headline-k (summary keys
hybrid_decode_step_ratio = AR steps / hybrid steps, hybrid_latency_ratio_b1 = AR latency / hybrid latency on
the default backend (vLLM), hybrid_true_reward_delta = relative change of the mean true reward).
Writes runs/bench/hybrid.json and merges the headline into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import heldout_requests, machine_load, merge_summary, write_result

LATENCY_USERS = 12  # single-user calls timed for the batch-1 latency
BATCH = 256


def quality(gen, world, users, req, prompts, hybrid, label: str) -> dict:
    """Pages for all users (batches of 256): decode steps, page shape, violations and true reward."""
    from policies.evaluation import pages_from_tokens

    results = []
    for s in range(0, len(prompts), BATCH):
        results += gen.decode(prompts[s:s + BATCH], hybrid=hybrid)
    pages = [r[0].page_ids for r in results]
    from homepage.pages import PageBatch

    structured, report = pages_from_tokens(gen.tok, pages)
    reward = world.true_page_reward(users, req, PageBatch.from_pages(structured, world.entity_index))
    decoded = [gen.tok.decode(p, strict=False) for p in pages]
    return {
        "label": label, "fill_k": hybrid.fill_k, "fill_row_len": hybrid.fill_row_len,
        "decode_steps_per_page": float(np.mean([x[0].decode_steps for x in results])),
        "tokens_per_page": float(np.mean([len(p) for p in pages])),
        "titles_per_page": float(np.mean([len(d.entity_ids) for d in decoded])),
        "rows_per_page": float(np.mean([len(d.rows) for d in decoded])),
        "filled_titles_per_page": float(np.mean([x[0].filled_titles for x in results])),
        "true_reward": float(reward.mean()), "true_reward_per_user": reward,
        "violations": int(gen.rules.violations(prompts, pages)["total"].sum()), "without_eop": report.without_eop,
    }


def timings(gen, prompts, configs, repeats: int) -> dict:
    """Median wall time of a B=256 batch (`repeats` times) and of single-user calls (LATENCY_USERS users),
    interleaved across configs so bursts of load from other processes hit all configs alike."""
    big: dict = {label: [] for label, _ in configs}
    one: dict = {label: [] for label, _ in configs}
    for _ in range(repeats):
        for label, h in configs:
            t = time.perf_counter()
            gen.decode(prompts[:BATCH], hybrid=h)
            big[label].append(time.perf_counter() - t)
    for p in prompts[:LATENCY_USERS]:
        for label, h in configs:
            t = time.perf_counter()
            gen.decode([p], hybrid=h)
            one[label].append(time.perf_counter() - t)
    n = min(BATCH, len(prompts))
    return {label: {"latency_b1_s": float(np.median(one[label])), "throughput_pages_per_s": n / float(np.median(big[label])),
                    "s_per_batch_b256": float(np.median(big[label])), "b256_all_s": big[label], "b1_all_s": one[label]}
            for label, _ in configs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default="runs/pretrain/model")
    ap.add_argument("--world", default="runs/world")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fill-row-len", type=int, nargs="+", default=[5, 6])
    ap.add_argument("--headline-k", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["vllm", "hf"])
    ap.add_argument("--repeats", type=int, default=3, help="timed B=256 batches per config")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process (see docs/benchmarks.md)")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # also the vLLM engine's worker processes
    torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"{args.model} has no checkpoint: run `python recipes/pretrain.py` first")
    from homepage.world import World, world_contexts
    from policies.generate import PageGenerator
    from policies.hybrid import HybridConfig

    load_before = machine_load()
    print(f"load before: {load_before}", flush=True)
    world = World.load(args.world)
    users, req = heldout_requests(world, args.users, seed=1)
    contexts = world_contexts(world, users, req)
    configs = [("autoregressive", HybridConfig())]
    configs += [(f"hybrid k={k} L={L}", HybridConfig(k, L)) for k in args.k for L in args.fill_row_len]
    result = {"model": args.model, "users": args.users, "batch": BATCH, "latency_users": LATENCY_USERS, "backends": {}}
    for backend in args.backends:
        print(f"{backend}:", flush=True)
        gen = PageGenerator(args.model, backend=backend, hf_batch_size=BATCH)
        prompts = gen.prompts(contexts)
        gen.decode(prompts[:16])  # warm-up
        rows = [quality(gen, world, users, req, prompts, h, label) for label, h in configs]
        times = timings(gen, prompts, configs, args.repeats)
        for r in rows:
            r.update(times[r["label"]])
            print(f"  {r['label']:<22} steps/page {r['decode_steps_per_page']:5.1f}  titles {r['titles_per_page']:4.1f}  "
                  f"true reward {r['true_reward']:.3f}  b1 {1e3 * r['latency_b1_s']:6.1f} ms  "
                  f"b256 {r['throughput_pages_per_s']:6.1f} pages/s  violations {r['violations']}", flush=True)
        ar = rows[0]
        for r in rows:
            diff = r.pop("true_reward_per_user") - ar["true_reward_per_user"] if r is not ar else None
            r["decode_step_ratio"] = ar["decode_steps_per_page"] / r["decode_steps_per_page"]
            r["latency_ratio_b1"] = ar["latency_b1_s"] / r["latency_b1_s"]
            r["throughput_ratio_b256"] = r["throughput_pages_per_s"] / ar["throughput_pages_per_s"]
            r["true_reward_delta"] = r["true_reward"] / ar["true_reward"] - 1
            if diff is not None:  # paired standard error of the mean difference, relative
                r["true_reward_delta_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)) / ar["true_reward"])
        ar.pop("true_reward_per_user")
        result["backends"][backend] = rows
        del gen
    result.update({"load_before": load_before, "load_after": machine_load()})
    write_result(args.out, "hybrid", result)
    main_backend = args.backends[0]
    head = next(r for r in result["backends"][main_backend] if r["fill_k"] == args.headline_k
                and r["fill_row_len"] == args.fill_row_len[0])
    keys = {"hybrid_decode_step_ratio": head["decode_step_ratio"], "hybrid_latency_ratio_b1": head["latency_ratio_b1"],
            "hybrid_true_reward_delta": head["true_reward_delta"], "hybrid_throughput_ratio_b256": head["throughput_ratio_b256"],
            "hybrid_headline": f"{main_backend}, k={head['fill_k']}, fill_row_len={head['fill_row_len']}"}
    if "hf" in result["backends"] and main_backend != "hf":
        hf = next(r for r in result["backends"]["hf"] if r["fill_k"] == args.headline_k and r["fill_row_len"] == args.fill_row_len[0])
        keys.update({"hybrid_latency_ratio_b1_hf": hf["latency_ratio_b1"], "hybrid_throughput_ratio_b256_hf": hf["throughput_ratio_b256"]})
    merge_summary(args.out, keys)
    print(keys)


if __name__ == "__main__":
    main()
