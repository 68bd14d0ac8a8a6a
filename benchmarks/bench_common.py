"""Shared pieces of the benchmarks: the summary file, machine load, held-out prompts and FLOP counting."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

PEAK_FP32_GFLOPS = 360.0  # nominal fp32 peak of this project's machine: 2 AVX-512 cores (issue 7)


def merge_summary(out_dir: str | Path, keys: dict) -> None:
    """Merges headline figures into out_dir/summary.json, keeping the other benchmarks' keys."""
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(keys)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def write_result(out_dir: str | Path, name: str, result: dict) -> None:
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")


def machine_load() -> dict:
    """Load averages (1, 5, 15 min) and CPU count: the machine is shared, so every result records them."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of `repeats` calls of fn() (and all of them)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times


def heldout_requests(world, n: int, seed: int = 0):
    """n held-out (test split) users and their requests, deterministic."""
    rng = np.random.default_rng(seed)
    users = world.sample_users(rng, n, split="test")
    return users, world.sample_requests(rng, users)


def matmul_gflops(threads: int = 2, m: int = 1024, k: int = 1024, n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a torch matmul [m, k] @ [k, n] right now: 1024^3 is what this (shared) machine delivers
    at best; the model's own shapes (e.g. 256 x 128 x 384) show what its small GEMMs can reach."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    reps = max(repeats, int(2e9 // (2 * m * k * n)))  # small shapes: enough calls for a stable time
    t, _ = median_time(lambda: [a @ b for _ in range(reps)], repeats)
    torch.set_num_threads(old)
    return 2 * m * k * n * reps / t / 1e9


def dense_flops_per_token(config) -> float:
    """Forward FLOPs per token of GenPage outside attention scores: 2 x (decoder matmuls + output projection
    and its content term + input content projection)."""
    H, L, I, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or H // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    C = getattr(config, "content_dim", 0)
    per_layer = H * (config.num_attention_heads * hd) * 2 + H * kv * 2 + 3 * H * I  # q, o; k, v; gate, up, down
    return 2.0 * (L * per_layer + H * V + H * C + C * V + C * H)


def attention_flops(config, context_sum: float) -> float:
    """Attention-score FLOPs (QK^T and AV) for tokens whose attended lengths sum to context_sum."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 4.0 * config.num_hidden_layers * config.num_attention_heads * hd * context_sum


def generation_flops(config, prompt_lens: list[int], gen_lens: list[int]) -> float:
    """Useful forward FLOPs of generating gen_lens tokens after prompt_lens (KV cache: every token passes
    through the model once; padding not counted)."""
    dense = dense_flops_per_token(config)
    total = 0.0
    for P, g in zip(prompt_lens, gen_lens):
        fed = P + max(g - 1, 0)  # the last generated token is never fed back
        ctx = P * (P + 1) / 2 + sum(P + j for j in range(1, max(g - 1, 0) + 1))
        total += dense * fed + attention_flops(config, ctx)
    return total


def non_embedding_params(config) -> int:
    """Parameters of the matmuls a token goes through (what 2N / 6N per token counts)."""
    return int(dense_flops_per_token(config) / 2)


def anonymous_pss(pid: int) -> float:
    """Bytes of a process's PSS that are anonymous or shared memory (Pss_Anon + Pss_Shmem of smaps_rollup); 0 where
    the kernel does not say."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Pss_Anon:", "Pss_Shmem:")))
    except OSError:
        return 0.0


def run_monitored(cmd: list[str], log_path: str | Path, milestones: dict[str, str] | None = None,
                  env: dict | None = None, interval: float = 0.5) -> dict:
    """Runs cmd as a subprocess; samples the memory of its whole process tree (Ray and vLLM workers
    included) every `interval` s and timestamps its output lines (written to log_path as '[  12.34] line').

    Returns wall_s, rc, peak_rss_mb (sum of RSS over the tree; shared pages counted once per process),
    peak_pss_mb (sum of PSS: shared pages split between processes, the tree's real footprint),
    peak_pss_anon_mb (the part of it that is anonymous or shared memory, Pss_Anon + Pss_Shmem: what the kernel
    cannot drop; the rest is mapped files, such as the memory-mapped log and encoding caches, that it can),
    peak_single_rss_mb (largest process), processes_max, peak_processes (at the sample of peak PSS, the
    largest processes as [command line, PSS in MB]: where the memory is) and milestones {name: seconds of the
    first output line containing the given text}."""
    import re
    import subprocess
    import threading

    import psutil

    milestones = milestones or {}
    seen: dict[str, float] = {}
    peak = {"rss": 0.0, "pss": 0.0, "anon": 0.0, "single": 0.0, "procs": 0, "at_peak": []}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # unbuffered: true line times

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            rss = pss = anon = single = 0.0
            each = []
            for p in procs:
                try:
                    mem = p.memory_full_info()
                    each.append((getattr(mem, "pss", mem.rss), " ".join(p.cmdline())[:80]))
                except psutil.Error:
                    continue
                rss += mem.rss
                anon += anonymous_pss(p.pid)
                pss += getattr(mem, "pss", mem.rss)
                single = max(single, mem.rss)
            if pss > peak["pss"]:
                peak["at_peak"] = sorted(each, reverse=True)[:6]
            peak["rss"], peak["pss"], peak["anon"] = max(peak["rss"], rss), max(peak["pss"], pss), max(peak["anon"], anon)
            peak["single"], peak["procs"] = max(peak["single"], single), max(peak["procs"], len(procs))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            line = ansi.sub("", line.rstrip("\n"))
            log.write(f"[{t:8.2f}] {line}\n")
            for name, text in milestones.items():
                if name not in seen and text in line:
                    seen[name] = t
    rc = proc.wait()
    done.set()
    sampler.join()
    mb = 1024 ** 2
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak["rss"] / mb,
            "peak_pss_mb": peak["pss"] / mb, "peak_pss_anon_mb": peak["anon"] / mb, "peak_single_rss_mb": peak["single"] / mb, "processes_max": peak["procs"],
            "peak_processes": [[cmd, round(b / mb)] for b, cmd in peak["at_peak"]], "milestones": seen, "log": str(log_path)}
