"""Benchmark: the Dr. GRPO step broken down from verl's timing metrics, and where start-up time goes.

    python benchmarks/grpo_step.py [--run runs/dr_grpo] [--run /tmp/genpage_bench/dr_grpo]

Reads a finished `recipes/dr_grpo.py` run (the first --run directory holding metrics): verl's per-step
`timing_s/*` from seed_*/metrics/attempt_*.jsonl (verl's file logger), the median over training steps after
the first (the first includes warm-up): generation (vLLM rollouts; the reward manager scores pages inside it,
in verl's agent loop), reward (collecting those scores), old log-probs, reference log-probs, advantages,
actor update, checkpoint saving, weight sync into vLLM; validation runs outside the step. It
derives achieved FLOP/s of the trainer's passes (2 x params x tokens for a log-prob pass, 6 x for the
update) against the machine's fp32 peak, and start-up from the run's timeline (bench_timeline.json, written
by benchmarks/memory.py, which launches a small run) or, without one, from file times in the run directory.
Without any run it says which command makes one and exits 0.
Writes runs/bench/grpo_step.json and merges grpo_step_s and grpo_step_breakdown into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from bench_common import PEAK_FP32_GFLOPS, attention_flops, dense_flops_per_token, merge_summary, write_result

PARTS = {  # breakdown name -> verl timing key, all inside verl's timing_s/step (ray_trainer.fit)
    "generation": "timing_s/gen", "reward": "timing_s/reward", "old_log_prob": "timing_s/old_log_prob",
    "ref_log_prob": "timing_s/ref", "advantages": "timing_s/adv", "update_actor": "timing_s/update_actor",
    "weight_sync": "timing_s/update_weights", "save_checkpoint": "timing_s/save_checkpoint",
}
OUTSIDE = {  # timed by verl outside timing_s/step, or inside generation
    "validation": "timing_s/testing",
    "reward_in_rollout_per_sample": "timing_s/agent_loop/compute_score/mean",  # the reward manager runs in the agent loop
}


def read_steps(run: Path) -> list[dict]:
    """Training steps (step >= 1, with timing) from every seed and attempt of a run."""
    steps = []
    for f in sorted(run.glob("seed_*/metrics/attempt_*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            data = rec.get("data", rec)
            if rec.get("step", 0) >= 1 and "timing_s/step" in data:
                steps.append({"seed_dir": f.parent.parent.name, "step": rec["step"], **data})
    return steps


def startup(run: Path) -> dict:
    """Start-up timeline: from bench_timeline.json when present, else from file times (seed start = its
    wandb_id.txt; trainer loop start = the wandb run directory's timestamp, created when verl's fit() starts,
    after Ray, the FSDP workers and the vLLM servers are up)."""
    tl = run / "bench_timeline.json"
    if tl.exists():
        data = json.loads(tl.read_text())
        m = data["milestones"]
        t0 = m.get("verl_run_start", 0.0)
        out = {"source": str(tl), "recipe_wall_s": data["wall_s"], "before_verl_s": t0}
        order = ["verl_run_start", "ray_up", "fsdp_actor_ref_built", "vllm_server_start", "rollout_workers_start",
                 "initial_validation_done", "step_1_done"]
        prev = t0
        for name in order[1:]:
            if name in m:
                out[f"to_{name}_s"] = m[name] - prev
                prev = m[name]
        if "initial_validation_done" in m:
            out["verl_startup_s"] = m.get("rollout_workers_start", m["initial_validation_done"]) - t0
        return out
    # Every seed's wandb_id.txt is written when the session starts (the seeds then train one after another in
    # that session), so a later seed's figure includes the earlier seeds' training: only the first is start-up.
    out = {"source": "file times (session start = the seeds' wandb_id.txt; later seeds include earlier seeds' training)"}
    for seed in sorted(run.glob("seed_*")):
        wid, wandb = seed / "wandb_id.txt", sorted(seed.glob("wandb/offline-run-*"))
        if wid.exists() and wandb:
            stamp = re.search(r"offline-run-(\d{8}_\d{6})", wandb[0].name)
            if stamp:
                fit = datetime.strptime(stamp.group(1), "%Y%m%d_%H%M%S").timestamp()
                out[f"session_start_to_{seed.name}_trainer_loop_s"] = fit - wid.stat().st_mtime
    return out


def flops_per_step(steps: list[dict], config) -> dict:
    """Mean useful FLOPs per step of each trainer pass, from verl's token counts."""
    tokens = np.mean([s["perf/total_num_tokens"] for s in steps])
    P = np.mean([s["prompt_length/mean"] for s in steps])
    R = np.mean([s["response_length/mean"] for s in steps])
    n_seq = tokens / (P + R)
    dense = dense_flops_per_token(config)
    attn = n_seq * attention_flops(config, (P + R) * (P + R + 1) / 2)  # full-sequence passes, causal
    fwd = dense * tokens + attn
    return {"tokens": float(tokens), "sequences": float(n_seq), "forward_flops": float(fwd),
            "generation_flops": float(fwd), "update_flops": float(3 * fwd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--run", action="append", default=None, help="run directory (repeatable; first with metrics wins)")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    runs = [Path(r) for r in (args.run or ["runs/dr_grpo", "/tmp/genpage_bench/dr_grpo"])]
    run = next((r for r in runs if read_steps(r)), None)
    if run is None:
        print(f"no Dr. GRPO metrics in {', '.join(map(str, runs))}: make a run with `python recipes/dr_grpo.py` "
              "(or `python benchmarks/memory.py`, which runs a small one under /tmp/genpage_bench); skipping")
        return
    steps = read_steps(run)
    trained = [s for s in steps if s["step"] > 1] or steps
    med = {name: float(np.median([s.get(key, 0.0) for s in trained])) for name, key in PARTS.items()}
    step_s = float(np.median([s["timing_s/step"] for s in trained]))
    med["other"] = step_s - sum(med.values())
    outside = {name: float(np.median([s[key] for s in trained if key in s])) for name, key in OUTSIDE.items()
               if any(key in s for s in trained)}
    cfg_path = run / "init_model" / "config.json"
    fl = {}
    if cfg_path.exists():
        from transformers import AutoConfig

        import policies  # noqa: F401

        config = AutoConfig.from_pretrained(run / "init_model")
        f = flops_per_step(trained, config)
        fl = {"per_step": f}
        for name, flops in (("generation", f["generation_flops"]), ("old_log_prob", f["forward_flops"]),
                            ("ref_log_prob", f["forward_flops"]), ("update_actor", f["update_flops"])):
            if med[name] > 0:
                g = flops / med[name] / 1e9
                fl[name] = {"gflops_per_s": g, "peak_fraction": g / PEAK_FP32_GFLOPS}
    summary_path = run / "summary.json"
    run_cfg = json.loads(summary_path.read_text()).get("config", {}) if summary_path.exists() else {}
    result = {
        "run": str(run), "steps_read": len(steps), "steps_used": len(trained),
        "shape": {k: run_cfg.get(k) for k in ("prompts_per_step", "group_size", "steps", "seeds")},
        "step_s_median": step_s, "breakdown_s_median": med,
        "breakdown_share": {k: v / step_s for k, v in med.items()}, "outside_step_s_median": outside,
        "per_step": [{k: s[k] for k in ["seed_dir", "step", "timing_s/step"] + [v for v in {**PARTS, **OUTSIDE}.values() if v in s]}
                     for s in steps],
        "flops": fl, "startup": startup(run),
    }
    write_result(args.out, "grpo_step", result)
    merge_summary(args.out, {"grpo_step_s": step_s, "grpo_step_breakdown": {k: round(v, 4) for k, v in med.items()},
                             "grpo_step_shape": result["shape"], "grpo_startup": result["startup"]})
    print(json.dumps({k: result[k] for k in ("run", "step_s_median", "breakdown_s_median", "flops", "startup")},
                     indent=2, default=float))


if __name__ == "__main__":
    main()
