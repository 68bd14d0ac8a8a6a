"""Renders the measured tables of docs/benchmarks.md from runs/bench/*.json (between the tables markers).

    python benchmarks/report.py [--bench runs/bench] [--doc docs/benchmarks.md]

The prose around the markers is kept; run after the benchmarks (`make bench` does) so the doc shows the
numbers of the last run, with the machine load recorded while they were taken.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- tables:begin (benchmarks/report.py) -->", "<!-- tables:end -->"


def load(bench: Path, name: str) -> dict | None:
    path = bench / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt_load(r: dict) -> str:
    a, b = r.get("load_before"), r.get("load_after")
    if not a or not b:
        return ""
    return f"load average (1 min) {a['loadavg_1m']:.1f} before, {b['loadavg_1m']:.1f} after ({a['time']} .. {b['time']})"


def generation_tables(g: dict) -> list[str]:
    rows = g["rows"]
    out = [f"### Rollout throughput, vLLM vs HF generate (`python benchmarks/generation.py`)", "",
           f"Sampled pages (temperature {g['temperature']}) for held-out users under the rule masks; {g['threads']} thread "
           f"per process; vLLM KV blocks of {g['vllm_block_size']} tokens; median over {rows['vllm_b256']['calls']} "
           f"interleaved calls; {fmt_load(g)}.", "",
           "| shape | vLLM s/call | HF s/call | vLLM pages/s | HF pages/s | vLLM tokens/s | HF tokens/s | vLLM / HF | vLLM GFLOP/s (% of peak) | HF GFLOP/s (% of peak) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("b1", "B=1"), ("b16", "B=16"), ("b256", "B=256"), ("grpo", "GRPO 32 x 8")):
        v, h = rows[f"vllm_{key}"], rows[f"hf_{key}"]
        out.append(f"| {label} | {v['s_per_call']:.3f} | {h['s_per_call']:.3f} | {v['pages_per_s']:.1f} | {h['pages_per_s']:.1f} | "
                   f"{v['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | **{v['pages_per_s'] / h['pages_per_s']:.2f}** | "
                   f"{v['gflops_per_s']:.1f} ({100 * v['peak_fraction']:.1f}%) | {h['gflops_per_s']:.1f} ({100 * h['peak_fraction']:.1f}%) |")
    v, h = rows["vllm_b256_unmasked"], rows["hf_b256_unmasked"]
    out.append(f"| B=256 unmasked | {v['s_per_call']:.3f} | {h['s_per_call']:.3f} | {v['pages_per_s']:.1f} | {h['pages_per_s']:.1f} | "
               f"{v['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | {v['pages_per_s'] / h['pages_per_s']:.2f} | "
               f"{v['gflops_per_s']:.1f} ({100 * v['peak_fraction']:.1f}%) | {h['gflops_per_s']:.1f} ({100 * h['peak_fraction']:.1f}%) |")
    f = g["forward_floor_b256"]
    m = g["matmul_gflops_now"]
    out += ["", f"Bare model forward at B=256 (one padded prefill + {f['gen_len']} KV-cached steps, HF eager, no masks or "
            f"sampling): {f['s']:.2f} s, {f['gflops_per_s']:.1f} GFLOP/s ({100 * f['peak_fraction']:.1f}% of peak), "
            f"{100 * f['share_of_hf_generate']:.0f}% of HF generate's time. fp32 matmul on this machine during the run: "
            f"1024^3 {m['1_threads']:.0f} GFLOP/s with 1 thread, {m['2_threads']:.0f} with 2; the model's decode-step MLP GEMM "
            f"256 x 128 x 384 {m.get('1_thread_256x128x384', float('nan')):.0f}, at B=1 (1 x 128 x 384) "
            f"{m.get('1_thread_1x128x384', float('nan')):.1f}. vLLM engine start: {g['vllm_engine_start_s']:.0f} s.", ""]
    if g.get("profiles"):
        groups = [k for k in next(iter(g["profiles"].values())) if k != "total_s"]
        out += ["cProfile of one B=256 call (share of the call; vLLM's engine core run in-process for it; groups can nest: "
                "the sampler includes the rule masks):", "",
                "| | " + " | ".join(groups) + " | total s |", "|---|" + "---|" * (len(groups) + 1)]
        for name, p in g["profiles"].items():
            out.append(f"| {name} | " + " | ".join(f"{100 * p[k]['share']:.0f}%" for k in groups) + f" | {p['total_s']:.2f} |")
        out.append("")
    return out


def hybrid_tables(h: dict) -> list[str]:
    out = [f"### Hybrid row decoding vs autoregressive (`python benchmarks/hybrid.py`)", "",
           f"Greedy pages for {h['users']} held-out users; B=1 latency is the median over {h['latency_users']} single-user "
           f"calls, B={h['batch']} throughput the median of timed batches, interleaved across configurations; "
           f"reward delta relative to autoregressive (paired standard error in brackets); {fmt_load(h)}.", ""]
    for backend, rows in h["backends"].items():
        out += [f"**{backend}**", "",
                "| decoding | decode steps / page | step ratio | titles / page | true reward | reward delta | B=1 ms | B=1 speed-up | B=256 pages/s | B=256 ratio | violations |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            se = f" ({100 * r['true_reward_delta_se']:.2f}%)" if "true_reward_delta_se" in r else ""
            out.append(f"| {r['label']} | {r['decode_steps_per_page']:.1f} | {r['decode_step_ratio']:.2f} | {r['titles_per_page']:.1f} | "
                       f"{r['true_reward']:.3f} | {100 * r['true_reward_delta']:+.2f}%{se} | {1e3 * r['latency_b1_s']:.0f} | "
                       f"{r['latency_ratio_b1']:.2f} | {r['throughput_pages_per_s']:.0f} | {r['throughput_ratio_b256']:.2f} | {r['violations']} |")
        out.append("")
    return out


def grpo_tables(s: dict) -> list[str]:
    out = [f"### Dr. GRPO step (`python benchmarks/grpo_step.py`)", "",
           f"Run `{s['run']}` (shape {s['shape']}); median over {s['steps_used']} training steps after the first.", "",
           "| part | s | share of step |", "|---|---|---|"]
    for k, v in s["breakdown_s_median"].items():
        out.append(f"| {k} | {v:.3f} | {100 * s['breakdown_share'][k]:.0f}% |")
    out.append(f"| **step** | **{s['step_s_median']:.3f}** | 100% |")
    for k, v in s.get("outside_step_s_median", {}).items():
        out.append(f"| ({k}, outside the step) | {v:.3f} | |")
    out.append("")
    fl = s.get("flops", {})
    if fl:
        out += ["| trainer pass | GFLOP/s | % of fp32 peak |", "|---|---|---|"]
        for k in ("generation", "old_log_prob", "ref_log_prob", "update_actor"):
            if k in fl:
                out.append(f"| {k} | {fl[k]['gflops_per_s']:.1f} | {100 * fl[k]['peak_fraction']:.1f}% |")
        out.append("")
    st = s.get("startup", {})
    if st:
        out += [f"Start-up (source: {st.get('source', '')}; `to_X` = seconds from the previous milestone to X):", "",
                "| milestone | s |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in st.items() if isinstance(v, (int, float))]
        out.append("")
    return out


def memory_tables(m: dict) -> list[str]:
    out = ["### Peak memory per recipe (`python benchmarks/memory.py`)", "",
           "| recipe | command | peak PSS of the process tree (MB) | peak RSS sum (MB) | largest process (MB) | processes | wall s | load (1 min) before, after |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in m["recipes"].items():
        cmd = " ".join(r["cmd"].split()[1:])  # without the interpreter's path
        ok = r["rc"] == 0
        out.append(f"| {name} | `{cmd}` | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_single_rss_mb']:.0f} | "
                   f"{r['processes_max']} | {r['wall_s']:.0f}{'' if ok else ' (failed, rc=' + str(r['rc']) + ')'} | "
                   f"{r['load_before']['loadavg_1m']:.1f}, {r['load_after']['loadavg_1m']:.1f} |")
    out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="runs/bench")
    ap.add_argument("--doc", default="docs/benchmarks.md")
    args = ap.parse_args()
    bench = Path(args.bench)
    lines: list[str] = []
    summary = load(bench, "summary") or {}
    if summary:
        keys = ["vllm_hf_throughput_ratio_b256", "hybrid_decode_step_ratio", "hybrid_latency_ratio_b1",
                "hybrid_true_reward_delta", "grpo_step_s", "grpo_step_breakdown", "peak_memory_mb"]
        lines += ["### Headline figures (`runs/bench/summary.json`)", "", "| key | value |", "|---|---|"]
        for k in keys:
            if k in summary:
                v = summary[k]
                lines.append(f"| `{k}` | {json.dumps(v) if isinstance(v, dict) else f'{v:.4g}'} |")
        lines.append("")
    for name, render in (("generation", generation_tables), ("hybrid", hybrid_tables), ("grpo_step", grpo_tables),
                         ("memory", memory_tables)):
        data = load(bench, name)
        lines += render(data) if data else [f"({name}: not measured yet; run `python benchmarks/{name}.py`)", ""]
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} / {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + BEGIN + "\n" + "\n".join(lines) + END + tail)
    print(f"tables written into {doc}")


if __name__ == "__main__":
    main()
