"""Benchmark: the scale ladder. Every stage at the toy and the medium preset, with costs per unit of work.

    python benchmarks/scale.py [--presets toy medium] [--scratch runs/scale] [--stages world data ...]

Presets: `toy` is the demo's configs (recipes/configs/*.yaml); `medium` is recipes/configs/scale/medium/ (20,000
titles, 200,000 users, 2,000,000 impressions, a GenPage of about 10 M parameters). Training runs a bounded number
of steps (PRESETS below: cost per step does not depend on how many steps run). Each stage is a subprocess with
its whole process tree sampled for memory (bench_common.run_monitored). A world or stage output that exists
under --scratch is reused (its figures are then those of the run that wrote it, kept in scale.json).

Per stage and preset: world generation (impressions/s); log validation (rows/s) and encoding (impressions/s),
timed in a child process; pretraining and reward-model training (tokens/s); masked vLLM generation (pages/s)
and the masks' share of its time (the same prompts unmasked); a Dr. GRPO step (s, median after the first); peak
memory (summed PSS of the process tree). Writes runs/bench/scale.json and prints the toy-to-medium ratios.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import machine_load, run_monitored, write_result

CONFIGS = {"toy": "recipes/configs", "medium": "recipes/configs/scale/medium"}
# Bounded work per preset: training steps, evaluation users, generated pages.
PRESETS = {
    "toy": {"pretrain_steps": 100, "rm_steps": 100, "grpo_steps": 4, "eval_users": 100, "gen_prompts": 256},
    "medium": {"pretrain_steps": 100, "rm_steps": 100, "grpo_steps": 4, "eval_users": 100, "gen_prompts": 256},
}
STAGES = ("world", "data", "pretrain", "train_rm", "generation", "dr_grpo")


def paths(scratch: Path, preset: str) -> dict[str, Path]:
    base = scratch / preset
    return {"world": base / "world", "pretrain": base / "pretrain", "rm": base / "rm", "dr_grpo": base / "dr_grpo",
            "cache": base / "cache", "logs_cache": base / "cache_logs", "logs": base / "logs"}


def commands(preset: str, p: dict[str, Path], bound: dict) -> dict[str, list[str]]:
    py, cfg = sys.executable, CONFIGS[preset]
    shared = [f"data_dir={p['world']}", f"cache_dir={p['cache']}", f"logs_cache_dir={p['logs_cache']}", "num_threads=2"]
    steps_p, steps_r = bound["pretrain_steps"], bound["rm_steps"]
    return {
        "world": [py, "recipes/make_world.py", "--config", f"{cfg}/world.yaml", f"out_dir={p['world']}", "workers=2"],
        "data": [py, __file__, "--measure-data", str(p["world"]), "--cache", str(p["cache"]),
                 "--logs-cache", str(p["logs_cache"])],
        "pretrain": [py, "recipes/pretrain.py", "--config", f"{cfg}/pretrain.yaml", f"out_dir={p['pretrain']}", *shared,
                     f"steps={steps_p}", f"eval_interval={steps_p}", f"checkpoint_interval={steps_p}",
                     f"eval_users={bound['eval_users']}", "warmup_steps=10"],
        "train_rm": [py, "recipes/train_rm.py", "--config", f"{cfg}/train_rm.yaml", f"out_dir={p['rm']}", *shared,
                     f"pretrained_dir={p['pretrain']}/model", f"steps={steps_r}", f"eval_interval={steps_r}",
                     f"checkpoint_interval={steps_r}", "generated_users=50", "warmup_steps=10"],
        "generation": [py, __file__, "--measure-generation", str(p["pretrain"] / "model"), "--world", str(p["world"]),
                       "--prompts", str(bound["gen_prompts"]), "--logs-cache", str(p["logs_cache"])],
        "dr_grpo": [py, "recipes/dr_grpo.py", "--config", f"{cfg}/dr_grpo.yaml", f"out_dir={p['dr_grpo']}",
                    f"data_dir={p['world']}", f"policy_dir={p['pretrain']}/model", f"rm_dir={p['rm']}/model",
                    f"logs_cache_dir={p['logs_cache']}", "seeds=[0]", f"steps={bound['grpo_steps']}", "eval_users=16",
                    "num_threads=2"],
    }


# -- measured in a child process (its own memory) ---------------------------------------------------------------

def measure_data(world: str, cache: str, logs_cache: str) -> dict:
    """Validation of the logs into the validated-logs cache (rows/s) and their encoding into the encoding cache
    (impressions/s)."""
    import shutil

    from homepage.dataset import open_dataset
    from homepage.logs import log_parts
    from policies.data import encode_logs
    from policies.tokenizer import GenPageTokenizer

    shutil.rmtree(logs_cache, ignore_errors=True)  # time a fresh validation (the stages after it map this entry)
    t0 = time.perf_counter()
    dataset, table, report = open_dataset(world, cache_dir=logs_cache)
    validate_s = time.perf_counter() - t0
    tok = GenPageTokenizer.from_dataset(dataset, table)
    shutil.rmtree(cache, ignore_errors=True)  # time a fresh encoding (the stages after it read this entry)
    t0 = time.perf_counter()
    encoded = encode_logs(table, tok, cache, log_parts(dataset.logs))
    encode_s = time.perf_counter() - t0
    return {"rows": table.num_rows, "validate_s": validate_s, "validate_rows_per_s": table.num_rows / validate_s,
            "encode_s": encode_s, "encode_impressions_per_s": table.num_rows / encode_s,
            "tokens": int(len(encoded.prompts.values) + len(encoded.pages.values)), "vocab": len(tok),
            "table_mb": table.nbytes / 2 ** 20, "bad_rows": report.bad_rows()}


def measure_generation(model_dir: str, world: str, n: int, logs_cache: str) -> dict:
    """Masked and unmasked sampled pages for n held-out logged contexts on the serving engine (median of 3)."""
    from homepage.dataset import open_dataset
    from homepage.logs import sample_impressions
    from policies import vllm_engine
    from policies.tokenizer import GenPageTokenizer
    from policies.vllm_rules import OPT_OUT_KEY

    _, table, _ = open_dataset(world, cache_dir=logs_cache)
    tok = GenPageTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode_context(imp.context) for imp in sample_impressions(table, "test", n, 0)]
    llm = vllm_engine.make_llm(model_dir, seed=0)
    out = {}
    for name, extra in (("masked", None), ("unmasked", {OPT_OUT_KEY: False})):
        vllm_engine.generate(llm, prompts[:16], 1.0, 64, tok.eop_id, extra_args=extra)  # warm-up
        times, tokens = [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            pages = vllm_engine.generate(llm, prompts, 1.0, 64, tok.eop_id, extra_args=extra)
            times.append(time.perf_counter() - t0)
            tokens = sum(len(s[0]["token_ids"]) for s in pages)
        out[f"{name}_pages_per_s"] = len(prompts) / statistics.median(times)
        out[f"{name}_tokens_per_page"] = tokens / len(prompts)
    out["mask_share"] = 1.0 - out["masked_pages_per_s"] / out["unmasked_pages_per_s"]
    out["prompts"] = len(prompts)
    return out


# -- figures each stage's outputs hold ----------------------------------------------------------------------------

def stage_figures(stage: str, p: dict[str, Path], logs: Path) -> dict:
    if stage == "world":
        s = json.loads((p["world"] / "summary.json").read_text())
        return {k: s.get(k) for k in ("impressions", "gen_impressions_per_s", "ground_truth_pages_per_s", "entities",
                                      "users")}
    if stage in ("data", "generation"):
        lines = [line for line in (logs / f"{stage}.log").read_text().splitlines() if "SCALE_RESULT " in line]
        return json.loads(lines[-1].split("SCALE_RESULT ", 1)[1])
    if stage == "pretrain":
        s = json.loads((p["pretrain"] / "summary.json").read_text())
        return {"tokens_per_s": s["tokens_per_s"], "parameters": s["parameters"], "train_pages": s["train_pages"],
                "heldout_page_loss": s["heldout_page_loss"]}
    if stage == "train_rm":
        s = json.loads((p["rm"] / "summary.json").read_text())
        return {"tokens_per_s": s.get("tokens_per_s"), "train_s": s.get("train_s"),
                "train_impressions": s.get("train_impressions")}
    if stage == "dr_grpo":
        recs = []
        for f in sorted(glob.glob(f"{p['dr_grpo']}/seed_*/metrics/attempt_*.jsonl")):
            recs += [json.loads(line) for line in open(f) if line.strip()]
        recs = sorted((r for r in recs if "timing_s/step" in r.get("data", {})), key=lambda r: r["step"])[1:]
        med = lambda k: statistics.median(r["data"][k] for r in recs) if recs and k in recs[0]["data"] else None  # noqa: E731
        return {"step_s": med("timing_s/step"), "gen_s": med("timing_s/gen"), "update_s": med("timing_s/update_actor"),
                "steps_timed": len(recs), "rollout_probs_diff_max": med("training/rollout_probs_diff_max")}
    raise ValueError(stage)


# The per-unit figure of each stage (stage, key in its figures, unit); the memory is the stage's whole run.
UNITS = (("world", "gen_impressions_per_s", "impressions/s"), ("data", "validate_rows_per_s", "rows/s validated"),
         ("data", "encode_impressions_per_s", "impressions/s encoded"), ("pretrain", "tokens_per_s", "tokens/s"),
         ("train_rm", "tokens_per_s", "tokens/s"), ("generation", "masked_pages_per_s", "masked pages/s"),
         ("generation", "mask_share", "masks' share of generation"), ("dr_grpo", "step_s", "s per step"))


def table(result: dict) -> list[dict]:
    """Toy against medium, per unit of work, with each stage's peak memory (summed PSS of its process tree)."""
    rows = []
    for stage, key, unit in UNITS:
        toy, med = result["runs"].get(f"toy/{stage}"), result["runs"].get(f"medium/{stage}")
        a, b = (r["figures"].get(key) if r else None for r in (toy, med))
        rows.append({"stage": stage, "unit": unit, "toy": a, "medium": b, "medium_over_toy": b / a if a and b else None,
                     "peak_mb_toy": round(toy["peak_pss_mb"]) if toy else None,
                     "peak_mb_medium": round(med["peak_pss_mb"]) if med else None})
    return rows


def markdown(rows: list[dict]) -> str:
    fmt = lambda v: "" if v is None else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"  # noqa: E731
    lines = ["| stage | per unit | toy | medium | medium / toy | peak MB toy | peak MB medium |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['unit']} | {fmt(r['toy'])} | {fmt(r['medium'])} | {fmt(r['medium_over_toy'])} | "
              f"{fmt(r['peak_mb_toy'])} | {fmt(r['peak_mb_medium'])} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--presets", nargs="+", default=["toy", "medium"], choices=list(CONFIGS))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--scratch", default="runs/scale")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--measure-data", help=argparse.SUPPRESS)
    ap.add_argument("--measure-generation", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--logs-cache", help=argparse.SUPPRESS)
    ap.add_argument("--world", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_data:
        print("SCALE_RESULT " + json.dumps(measure_data(args.measure_data, args.cache, args.logs_cache)), flush=True)
        return
    if args.measure_generation:
        print("SCALE_RESULT " + json.dumps(measure_generation(args.measure_generation, args.world, args.prompts, args.logs_cache)),
              flush=True)
        return

    out_file = Path(args.out) / "scale.json"
    result = json.loads(out_file.read_text()) if out_file.exists() else {}
    result.setdefault("runs", {})
    for preset in args.presets:
        p = paths(Path(args.scratch), preset)
        cmds = commands(preset, p, PRESETS[preset])
        for stage in args.stages:
            done = {"world": p["world"] / "summary.json", "pretrain": p["pretrain"] / "summary.json",
                    "train_rm": p["rm"] / "summary.json", "dr_grpo": p["dr_grpo"] / "summary.json"}.get(stage)
            key = f"{preset}/{stage}"
            if done is not None and done.exists() and key in result["runs"]:
                print(f"[scale] {key}: reusing {done}")
                continue
            print(f"[scale] {key}: {' '.join(cmds[stage])}", flush=True)
            run = run_monitored(cmds[stage], p["logs"] / f"{stage}.log")
            if run["rc"] != 0:
                raise SystemExit(f"[scale] {key} failed (rc {run['rc']}): see {run['log']}")
            result["runs"][key] = {**run, "figures": stage_figures(stage, p, p["logs"]),
                                   "date": time.strftime("%Y-%m-%d %H:%M"), "load": machine_load()}
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(result, indent=2))  # after every stage: a long run keeps what it measured
            f = result["runs"][key]
            print(f"[scale] {key}: {f['wall_s']:.0f} s, peak {f['peak_pss_mb']:.0f} MB, {json.dumps(f['figures'])}")

    result["table"] = table(result)
    write_result(args.out, "scale", result)
    print(markdown(result["table"]))


if __name__ == "__main__":
    main()
