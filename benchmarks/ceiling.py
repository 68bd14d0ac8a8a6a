"""Benchmark: how far post-training can go on a world with ground truth (best-of-n curves, rl/ceiling.py).

    python benchmarks/ceiling.py [--data runs/world] [--rm runs/rm/model] [--requests 300] [--n 64]
        [--policies pretrained=runs/pretrain/model rl=runs/dr_grpo/model ...] [--out runs/ceiling]

For each policy, `--n` masked pages sampled at temperature 1 for each of `--requests` held-out (test-split) logged
contexts (Dr. GRPO's evaluation contexts), each scored by the reward model and the environment's truth. Per
policy, for n = 1, 2, 4, ... up to --n: the truth of the RM's best-of-n pick, what the RM believes of it, and the
truth of the truth's pick; and the RM-truth correlation across each request's samples. Then the ground-truth greedy
page builder under the same masks on the same requests (rl.ceiling.greedy_page: the ceiling). The gap table lists
each policy's mean sampled page (n = 1) and its best-of-n under either selector, and the ceiling. Writes
out/summary.json and out/best_of_n.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import machine_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/world", help="dataset directory with an environment (the truth)")
    parser.add_argument("--rm", default="runs/rm/model", help="reward model directory")
    parser.add_argument("--policies", nargs="+", default=["pretrained=runs/pretrain/model", "rl=runs/dr_grpo/model"],
                        help="name=checkpoint_dir per policy")
    parser.add_argument("--requests", type=int, default=300, help="held-out contexts")
    parser.add_argument("--n", type=int, default=64, help="pages sampled per context (the largest n)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ceiling")
    args = parser.parse_args()

    from homepage.dataset import open_dataset
    from homepage.logs import sample_impressions
    from rl.ceiling import curves, greedy_page, sample_and_judge
    from rl.data import prompt_rows
    from rl.reward_manager import PageJudge

    policies = dict(p.split("=", 1) for p in args.policies)
    judge = PageJudge.from_dirs(args.data, "auto", next(iter(policies.values())), args.rm, format_weight=1.0)
    if judge.env is None:
        raise SystemExit(f"{args.data} declares no environment: best-of-n under the truth needs one")
    _, table, _ = open_dataset(args.data)
    heldout = sample_impressions(table, "test", args.requests, seed=1)  # Dr. GRPO's evaluation contexts
    infos = [r["extra_info"] for r in prompt_rows(judge.tok, heldout, "test")]
    prompts = [judge.tok.encode_context(imp.context) for imp in heldout]
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n < args.n] + [args.n]
    result = {"requests": len(prompts), "samples_per_request": args.n, "machine": machine_load(), "policies": {}}
    for name, path in policies.items():
        t0 = time.perf_counter()
        scores = sample_and_judge(path, judge, prompts, infos, args.n, args.max_new_tokens, args.seed)
        c = curves(scores, ns)
        c.update({"checkpoint": path, "violations": int(scores["violations"].sum()), "wall_s": time.perf_counter() - t0})
        result["policies"][name] = c
        print(f"[ceiling] {name}: n={ns[-1]} RM pick {c['rm_pick_true'][-1]:.3f} (RM believes {c['rm_pick_rm'][-1]:.3f}), "
              f"truth pick {c['true_pick_true'][-1]:.3f}, n=1 {c['rm_pick_true'][0]:.3f}", flush=True)
    t0 = time.perf_counter()
    greedy = [greedy_page(judge.env, judge.rules, judge.tok, imp.context, p)[0] for imp, p in zip(heldout, prompts)]
    g = judge.judge(prompts, greedy, infos)
    result["greedy_ceiling"] = {"true_reward": float(g.true.mean()), "rm_reward": float(g.rm.mean()),
                                "titles_per_page": float(g.n_entities.mean()),
                                "violations": int(sum(v.sum() for v in g.violations.values())),
                                "wall_s": time.perf_counter() - t0}
    print(f"[ceiling] greedy ground-truth builder: {result['greedy_ceiling']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "best_of_n.png")
    print("| policy | n = 1 | RM pick, n = %d | (RM believes) | truth pick, n = %d | RM-truth r within request |" % (ns[-1], ns[-1]))
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in result["policies"].items():
        print(f"| {name} | {c['rm_pick_true'][0]:.3f} | {c['rm_pick_true'][-1]:.3f} | {c['rm_pick_rm'][-1]:.3f} | "
              f"{c['true_pick_true'][-1]:.3f} | {c['rm_true_pearson_within_request']:.2f} |")
    print(f"| greedy ground-truth builder | {result['greedy_ceiling']['true_reward']:.3f} | | | | |")


def plot(result: dict, path: Path) -> None:
    """True reward of the RM's pick (solid), the RM's belief about it (dashed) and the truth's pick (dotted)
    against n, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, c) in enumerate(result["policies"].items()):
        color = f"C{i}"
        ax.plot(c["n"], c["rm_pick_true"], "-o", color=color, label=f"{name}: RM pick, true reward")
        ax.plot(c["n"], c["rm_pick_rm"], "--", color=color, label=f"{name}: RM pick, RM's belief")
        ax.plot(c["n"], c["true_pick_true"], ":", color=color, label=f"{name}: truth pick")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (pages sampled per request)")
    ax.set_ylabel("page reward")
    ax.set_title(f"best-of-n, {result['requests']} held-out requests")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
