"""Benchmark: rollout throughput, vLLM vs HF generate, same model, same rule masks, same prompts.

    python benchmarks/generation.py [--model runs/pretrain/model] [--world runs/world] [--repeats 3]

Sampled pages (temperature 1, what rollouts do) for held-out users at batch sizes 1, 16 and 256, and in the
GRPO shape (32 prompts x 8 samples: vLLM's n=8 can share each prompt's full KV blocks through prefix caching;
HF generate gets the prompts repeated, as `num_return_sequences` does). The vLLM engine is the generation
API's (policies.generate.make_generation_llm: KV blocks of 32 tokens; plain requests are masked by the
entry-point rule processor as everywhere else). Reports pages/s, generated tokens/s, the vLLM/HF ratio
side by side, and where the time goes: the cost of the rule masks (the same batch unmasked), the model's own
forward passes (a bare KV-cached loop over the same shapes) and a cProfile breakdown of one B=256 call of
each backend (vLLM's engine run in-process for it), plus achieved FLOP/s against the machine's fp32 peak.
Writes runs/bench/generation.json and merges headline figures into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import (PEAK_FP32_GFLOPS, generation_flops, heldout_requests, machine_load, matmul_gflops, median_time,
                          merge_summary, non_embedding_params, write_result)

BATCHES = (1, 16, 256)
GRPO_PROMPTS, GRPO_SAMPLES = 32, 8
TEMPERATURE = 1.0


def setup(model_dir: str, world_dir: str, n: int):
    from homepage.world import World, world_contexts
    from policies.rules import RuleSet
    from policies.tokenizer import GenPageTokenizer

    world = World.load(world_dir)
    tok = GenPageTokenizer.from_pretrained(model_dir)
    users, req = heldout_requests(world, n)
    prompts = [tok.encode_context(c) for c in world_contexts(world, users, req)]
    return tok, RuleSet.from_pretrained(model_dir), prompts


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    import policies  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_vllm(llm, tok, prompts, n: int = 1, masked: bool = True) -> list[list[int]]:
    from policies import vllm_engine
    from policies.vllm_rules import OPT_OUT_KEY

    out = vllm_engine.generate(llm, prompts, TEMPERATURE, MAX_TOKENS, tok.eop_id, n=n,
                               extra_args=None if masked else {OPT_OUT_KEY: False})
    return [s["token_ids"] for o in out for s in o]


def run_hf(model, tok, rules, prompts, batch_size: int, masked: bool = True) -> list[list[int]]:
    from policies.hf_generation import generate_pages_hf

    return generate_pages_hf(model, tok, prompts, TEMPERATURE, MAX_TOKENS, rules=rules if masked else None,
                             batch_size=batch_size)


MAX_TOKENS = 55  # the most a page holds under the default rules: 6 rows x (1 + 8) + [EOP]


def measure_all(cases: dict, config, repeats: int) -> dict:
    """Times every case {key: (label, fn, calls)} `repeats` times, interleaved (case after case within each
    repeat, so a burst of load from other processes hits all cases alike); per case the median seconds per
    call, pages/s, generated tokens/s and useful GFLOP/s (from the first repeat's pages)."""
    times: dict = {k: [] for k in cases}
    firsts: dict = {k: [] for k in cases}
    for rep in range(repeats):
        for key, (label, fn, calls) in cases.items():
            for prompts in calls:
                t = time.perf_counter()
                pages = fn(prompts)
                times[key].append(time.perf_counter() - t)
                if rep == 0:
                    firsts[key].append((prompts, pages))
    rows = {}
    for key, (label, _, _) in cases.items():
        outs = firsts[key]
        n_pages = np.mean([len(p) for _, p in outs])
        tokens = np.mean([sum(map(len, p)) for _, p in outs])
        flops = np.mean([generation_flops(config, [len(q) for q in qs for _ in range(len(p) // len(qs))], list(map(len, p)))
                         for qs, p in outs])
        t = float(np.median(times[key]))
        rows[key] = {"label": label, "s_per_call": t, "pages_per_s": n_pages / t, "tokens_per_s": tokens / t,
                     "pages_per_call": float(n_pages), "tokens_per_page": float(tokens / n_pages),
                     "gflops_per_s": flops / t / 1e9, "peak_fraction": flops / t / 1e9 / PEAK_FP32_GFLOPS,
                     "calls": len(times[key]), "s_per_call_all": times[key]}
        print(f"  {label:<32} {t:8.3f} s/call {rows[key]['pages_per_s']:9.1f} pages/s {rows[key]['tokens_per_s']:9.0f} tok/s "
              f"{rows[key]['gflops_per_s']:6.1f} GFLOP/s", flush=True)
    return rows


def forward_floor(model, prompts: list[list[int]], gen_len: int, pad_id: int) -> float:
    """Seconds of the bare model work of a batch: one padded prefill and gen_len KV-cached single-token steps
    (fixed inputs, no sampling, no masks, no generate bookkeeping)."""
    from policies.data import pad_batch

    B = len(prompts)
    ids, attn = pad_batch(prompts, pad_id, side="left")  # [B, W] each
    with torch.no_grad():
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=attn, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(gen_len - 1):
            attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.long)], -1)
            out = model(input_ids=nxt, attention_mask=attn, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t


PROFILE_GROUPS = {  # (file fragment, function name) -> group; cumulative time of the outermost match
    "model forward": [("vllm/model_executor/models/llama.py", "forward"), ("modeling_genpage.py", "forward")],
    "logits (output projection)": [("vllm_genpage.py", "compute_logits")],
    "rule masks": [("vllm_rules.py", "apply"), ("vllm_rules.py", "update_state"), ("hf_generation.py", "__call__")],
    "sampler (incl. masks)": [("v1/sample/sampler.py", "forward")],
    "scheduler": [("v1/core/sched/scheduler.py", "schedule"), ("v1/core/sched/scheduler.py", "update_from_output")],
    "input preparation": [("gpu_model_runner.py", "_prepare_inputs"), ("cpu_model_runner.py", "_prepare_inputs")],
    "output processing": [("v1/engine/output_processor.py", "process_outputs")],
}


def profile_groups(prof: cProfile.Profile, total: float) -> dict:
    stats = pstats.Stats(prof).stats
    out = {}
    for group, keys in PROFILE_GROUPS.items():
        ct = 0.0
        for (file, _, func), (_, _, _, cum, _) in stats.items():
            if any(f in file and func == name for f, name in keys):
                ct = max(ct, cum) if group == "model forward" else ct + cum
        out[group] = {"s": ct, "share": ct / total if total else 0.0}
    out["total_s"] = total
    return out


def profile_vllm(args) -> None:
    """(subprocess) cProfile of one B=256 vLLM call with the engine core in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from policies.generate import make_generation_llm

    tok, rules, prompts = setup(args.model, args.world, 256)
    llm = make_generation_llm(args.model, seed=0, block_size=args.block_size)
    run_vllm(llm, tok, prompts[:16])
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    run_vllm(llm, tok, prompts)
    prof.disable()
    import json

    print("PROFILE " + json.dumps(profile_groups(prof, time.perf_counter() - t)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default="runs/pretrain/model")
    ap.add_argument("--world", default="runs/world")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process (see docs/benchmarks.md)")
    ap.add_argument("--block-size", type=int, default=32,
                    help="vLLM KV block size (vLLM-CPU's default 128 is longer than our prompts: no prefix sharing)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdowns (a second engine start)")
    ap.add_argument("--profile-vllm", action="store_true", help=argparse.SUPPRESS)  # internal: the subprocess
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # also the vLLM engine's worker processes
    torch.set_num_threads(args.threads)
    if args.profile_vllm:
        return profile_vllm(args)
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"{args.model} has no checkpoint: run `python recipes/pretrain.py` first")
    load_before = machine_load()
    print(f"load before: {load_before}", flush=True)
    peak_now = {f"{t}_threads": matmul_gflops(t) for t in (1, 2)}
    peak_now["1_thread_256x128x384"] = matmul_gflops(1, 256, 128, 384)  # a decode step's MLP GEMM at B=256
    peak_now["1_thread_1x128x384"] = matmul_gflops(1, 1, 128, 384)  # the same at B=1
    tok, rules, prompts = setup(args.model, args.world, 256)
    grpo_prompts = prompts[:GRPO_PROMPTS]
    model = hf_model(args.model)
    config = model.config
    from policies.generate import make_generation_llm

    t = time.perf_counter()
    llm = make_generation_llm(args.model, seed=0, block_size=args.block_size)
    engine_start_s = time.perf_counter() - t
    run_vllm(llm, tok, prompts[:16])  # warm-up
    run_hf(model, tok, rules, prompts[:16], 16)

    def calls(B: int) -> list:  # B = 1: latency over 4 different users per repeat
        return [prompts[i:i + 1] for i in range(4)] if B == 1 else [prompts[:B]]

    rep = [p for p in grpo_prompts for _ in range(GRPO_SAMPLES)]
    cases = {}
    for B in BATCHES:
        cases[f"vllm_b{B}"] = (f"vLLM B={B}", lambda p: run_vllm(llm, tok, p), calls(B))
        cases[f"hf_b{B}"] = (f"HF generate B={B}", lambda p, B=B: run_hf(model, tok, rules, p, B), calls(B))
    cases["vllm_grpo"] = (f"vLLM {GRPO_PROMPTS}x{GRPO_SAMPLES} (n={GRPO_SAMPLES})",
                          lambda p: run_vllm(llm, tok, p, n=GRPO_SAMPLES), [grpo_prompts])
    cases["hf_grpo"] = (f"HF generate {GRPO_PROMPTS}x{GRPO_SAMPLES} (repeated)",
                        lambda p: run_hf(model, tok, rules, rep, len(rep)), [grpo_prompts])
    cases["vllm_b256_unmasked"] = ("vLLM B=256 unmasked", lambda p: run_vllm(llm, tok, p, masked=False), [prompts])
    cases["hf_b256_unmasked"] = ("HF generate B=256 unmasked", lambda p: run_hf(model, tok, rules, p, 256, masked=False),
                                 [prompts])
    rows = measure_all(cases, config, args.repeats)
    gen_len = int(round(rows["hf_b256"]["tokens_per_page"]))
    floor_s, _ = median_time(lambda: forward_floor(model, prompts, gen_len, tok.pad_id), args.repeats)
    floor_flops = generation_flops(config, [len(p) for p in prompts], [gen_len] * len(prompts))

    profiles = {}
    if not args.no_profile:
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        run_hf(model, tok, rules, prompts, 256)
        prof.disable()
        profiles["hf_b256"] = profile_groups(prof, time.perf_counter() - t)
        del llm  # the profiling engine gets the memory
        import gc
        import json

        gc.collect()
        res = subprocess.run([sys.executable, __file__, "--profile-vllm", "--model", args.model, "--world", args.world,
                              "--threads", str(args.threads), "--block-size", str(args.block_size)], capture_output=True, text=True, env=os.environ.copy())
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("PROFILE ")]
        if line:
            profiles["vllm_b256"] = json.loads(line[-1][len("PROFILE "):])
        else:
            print("vLLM profile failed:\n" + res.stderr[-3000:])

    ratio = {k: rows[f"vllm_{k}"]["pages_per_s"] / rows[f"hf_{k}"]["pages_per_s"] for k in ("b1", "b16", "b256", "grpo")}
    result = {
        "model": args.model, "parameters_non_embedding": non_embedding_params(config), "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS, "threads": args.threads, "vllm_block_size": args.block_size, "vllm_engine_start_s": engine_start_s,
        "rows": rows, "vllm_hf_ratio_pages_per_s": ratio,
        "mask_cost": {
            "vllm_b256_masked_over_unmasked_s": rows["vllm_b256"]["s_per_call"] / rows["vllm_b256_unmasked"]["s_per_call"],
            "hf_b256_masked_over_unmasked_s": rows["hf_b256"]["s_per_call"] / rows["hf_b256_unmasked"]["s_per_call"],
        },
        "forward_floor_b256": {"s": floor_s, "gen_len": gen_len, "gflops_per_s": floor_flops / floor_s / 1e9,
                               "peak_fraction": floor_flops / floor_s / 1e9 / PEAK_FP32_GFLOPS,
                               "share_of_hf_generate": floor_s / rows["hf_b256"]["s_per_call"],
                               "share_of_vllm": floor_s / rows["vllm_b256"]["s_per_call"]},
        "profiles": profiles, "peak_fp32_gflops_nominal": PEAK_FP32_GFLOPS, "matmul_gflops_now": peak_now,
        "load_before": load_before, "load_after": machine_load(),
    }
    write_result(args.out, "generation", result)
    merge_summary(args.out, {
        "vllm_hf_throughput_ratio_b256": ratio["b256"], "vllm_hf_throughput_ratio_b1": ratio["b1"],
        "vllm_hf_throughput_ratio_b16": ratio["b16"], "vllm_hf_throughput_ratio_grpo": ratio["grpo"],
        "vllm_pages_per_s_b256": rows["vllm_b256"]["pages_per_s"], "hf_pages_per_s_b256": rows["hf_b256"]["pages_per_s"],
        "vllm_tokens_per_s_b256": rows["vllm_b256"]["tokens_per_s"], "hf_tokens_per_s_b256": rows["hf_b256"]["tokens_per_s"],
        "generation_peak_fraction_vllm_b256": rows["vllm_b256"]["peak_fraction"],
        "generation_peak_fraction_hf_b256": rows["hf_b256"]["peak_fraction"],
    })
    print(f"vLLM/HF pages/s: {ratio}; load after: {result['load_after']}")


if __name__ == "__main__":
    main()
