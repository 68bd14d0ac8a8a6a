"""Benchmark: peak memory of each recipe, run as a subprocess with its whole process tree sampled.

    python benchmarks/memory.py [--recipes make_world pretrain train_rm dr_grpo] [--scratch /tmp/genpage_bench]

Each recipe runs at its default model and batch shapes, with fewer steps and evaluation users (memory
depends on the shapes, not on how many steps run; the sizes used are recorded): make_world at its default
size; pretrain 50 steps and 100 evaluation users; train_rm 50 steps and 100 generated users; dr_grpo 3 steps
of the default prompts x samples, one seed, 32 evaluation users; num_threads=1 (--threads; the recipes'
default 2 stalls on a shared, loaded machine, docs/benchmarks.md). Outputs go under --scratch, never runs/.
Reported per recipe: the peak summed PSS of the process tree (Ray and vLLM workers included; shared pages
split between processes, so this is the footprint), the peak summed RSS (shared pages counted in every
process), the largest single process, and wall time. The Dr. GRPO run also leaves a start-up timeline
(bench_timeline.json) and verl's step metrics that benchmarks/grpo_step.py reads.
Writes runs/bench/memory.json and merges `peak_memory_mb` into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_common import machine_load, merge_summary, run_monitored, write_result

GRPO_MILESTONES = {  # timeline name -> first output line containing this text (verl 0.9.1 + rl/ prints)
    "verl_run_start": "starting verl run",
    "ray_up": "Started a local Ray instance",
    "fsdp_actor_ref_built": "After FSDP",
    "vllm_server_start": "(vLLMHttpServer",
    "rollout_workers_start": "(AgentLoopWorker",
    "initial_validation_done": "Initial validation metrics",
    "step_1_done": "step:1 -",
    "final_validation_done": "Final validation metrics",
}


def recipe_commands(scratch: Path, threads: int) -> dict[str, list[str]]:
    py, th = sys.executable, f"num_threads={threads}"
    return {
        "make_world": [py, "recipes/make_world.py", f"out_dir={scratch}/world"],
        "pretrain": [py, "recipes/pretrain.py", "--force", f"out_dir={scratch}/pretrain", "steps=50", "eval_users=100", th],
        "train_rm": [py, "recipes/train_rm.py", "--force", f"out_dir={scratch}/rm", "steps=50", "generated_users=100", th],
        "dr_grpo": [py, "recipes/dr_grpo.py", "--force", f"out_dir={scratch}/dr_grpo", f"rm_dir={scratch}/rm/model",
                    "steps=3", "seeds=[0]", "eval_users=32", th],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--recipes", nargs="+", default=["make_world", "pretrain", "train_rm", "dr_grpo"])
    ap.add_argument("--scratch", default="/tmp/genpage_bench")
    ap.add_argument("--threads", type=int, default=1, help="num_threads of each recipe (docs/benchmarks.md: why 1)")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    commands = recipe_commands(scratch, args.threads)
    unknown = set(args.recipes) - set(commands)
    if unknown:
        raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; known: {list(commands)}")
    if "dr_grpo" in args.recipes and "train_rm" not in args.recipes and not (scratch / "rm/model/config.json").exists():
        raise SystemExit(f"dr_grpo needs a reward model at {scratch}/rm/model: include train_rm in --recipes")
    path = Path(args.out) / "memory.json"
    result = json.loads(path.read_text()) if path.exists() else {"recipes": {}}
    for name in args.recipes:
        print(f"[memory] {name}: {' '.join(commands[name][1:])}", flush=True)
        load = machine_load()
        r = run_monitored(commands[name], scratch / f"{name}.log", GRPO_MILESTONES if name == "dr_grpo" else None,
                          env={"OMP_NUM_THREADS": str(args.threads)})
        r.update({"load_before": load, "load_after": machine_load()})
        print(f"[memory] {name}: rc={r['rc']} wall {r['wall_s']:.0f} s, peak PSS {r['peak_pss_mb']:.0f} MB, "
              f"peak RSS sum {r['peak_rss_mb']:.0f} MB, largest process {r['peak_single_rss_mb']:.0f} MB, "
              f"{r['processes_max']} processes", flush=True)
        if r["rc"] != 0:
            print(f"[memory] {name} failed; see {r['log']}")
        if name == "dr_grpo" and r["rc"] == 0:
            (scratch / "dr_grpo" / "bench_timeline.json").write_text(json.dumps(
                {"milestones": r["milestones"], "wall_s": r["wall_s"], "log": r["log"]}, indent=2) + "\n")
        result["recipes"][name] = r
        write_result(args.out, "memory", result)
    ok = {k: v for k, v in result["recipes"].items() if v["rc"] == 0}
    merge_summary(args.out, {"peak_memory_mb": {k: round(v["peak_pss_mb"]) for k, v in ok.items()},
                             "peak_rss_sum_mb": {k: round(v["peak_rss_mb"]) for k, v in ok.items()}})


if __name__ == "__main__":
    main()
