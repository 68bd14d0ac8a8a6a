"""Benchmark: world generation throughput and ground-truth evaluation throughput on this machine.

    python benchmarks/world.py [--impressions 50000] [--repeats 3]

Target (issue: foundation): 50k impressions generated and written as Parquet in under 60 s on 2 cores.
Writes runs/bench/world.json and merges its headline figures into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from homepage.logs import batch_to_table
from homepage.config import WorldConfig
from homepage.world import World


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--impressions", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()

    cfg = WorldConfig(n_impressions=args.impressions)
    t = time.perf_counter()
    world = World.generate(cfg)
    world_s = time.perf_counter() - t

    gen_s, gt_s = [], []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            batches = []
            for k, batch in enumerate(world.iter_logs(args.impressions, seed=rep)):
                pq.write_table(batch_to_table(batch, world), Path(tmp) / f"part-{k:05d}.parquet", compression="zstd")
                batches.append(batch)
            gen_s.append(time.perf_counter() - t0)
        # Ground truth on every generated page (exact expectation, vectorized).
        t2 = time.perf_counter()
        for batch in batches:
            world.true_page_reward(batch.user, batch.requests, batch.pages)
        gt_s.append(time.perf_counter() - t2)

    result = {
        "impressions": args.impressions,
        "repeats": args.repeats,
        "world_build_s": world_s,
        "gen_seconds_median": float(np.median(gen_s)),
        "gen_impressions_per_s": args.impressions / float(np.median(gen_s)),
        "ground_truth_pages_per_s": args.impressions / float(np.median(gt_s)),
        "target_met_50k_under_60s": bool(np.median(gen_s) * 50_000 / args.impressions < 60.0),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text(json.dumps(result, indent=2) + "\n")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({
        "world_gen_impressions_per_s": result["gen_impressions_per_s"],
        "world_gen_50k_seconds": result["gen_seconds_median"] * 50_000 / args.impressions,
        "ground_truth_pages_per_s": result["ground_truth_pages_per_s"],
    })
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
