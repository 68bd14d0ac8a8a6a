"""Benchmark: this project's Dr. GRPO step against TRL's `GRPOTrainer` on the same checkpoint, reward model, prompts
and shape, both under the business-rule masks.

    python benchmarks/peers.py [--steps 8] [--repeats 2] [--data runs/world] [--policy runs/pretrain/model]
                               [--rm runs/rm/model] [--out runs/bench]

Needs TRL, the `bench` extra (`pip install -e .[bench]`; `make bench-peers` installs it and runs this), and the
demo's world, pretrained policy and reward model. Without TRL it says so and exits 0.

Each repeat runs both trainers, each in a fresh process (the order alternates between repeats, so a drift of the
machine's speed falls on both), `--steps` steps of 16 prompts x 8 pages each, 2 torch threads:
- **the project**: `recipes/dr_grpo.py credit=page seeds=[0] steps=N` (Dr. GRPO as published, one scalar reward per
  page: what TRL computes; the demo's token credit is not in TRL). Phases from verl's `timing_s/*`: generation
  (vLLM rollouts; with `reward_timing=streamed` the reward is scored inside them), reward (the whole batch after
  the rollout, the default), reference log-probs, actor update, the rest.
- **TRL**: `GRPOTrainer(loss_type="dr_grpo", scale_rewards="none", beta=kl_coef)` at the recipe's learning rate,
  grad clip and page budget (`max_completion_length`), HF `generate` on CPU with the project's `RuleMaskProcessor`
  as a logits processor, the training prompts the project's run wrote (its data/train.parquet), and as reward
  `rl.reward_manager.PageJudge`: the same RM page score plus format reward the project's reward manager returns.
  Phases timed around TRL's own calls: generation (`generate`), reward, reference log-probs, the rest (the policy's
  forward and backward, the optimizer).
Both report the environment's exact expected reward of every step's pages (true reward: never trained on) and
the rule violations, so speed is not bought with quality. Step medians exclude each run's first step (warm-up).

Writes runs/bench/peers.json (per step of every run, the medians, the ratios) and merges peers_* keys into
runs/bench/summary.json; docs/benchmarks.md has the measured table and what each phase holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import machine_load, merge_summary, write_result  # noqa: E402
from grpo_step import read_steps  # noqa: E402

PHASES = ("generation", "reward", "ref_log_prob", "update", "other")
PROJECT_PHASES = {"generation": "timing_s/gen", "reward": "timing_s/reward", "ref_log_prob": "timing_s/ref",
                  "update": "timing_s/update_actor"}
TRL_VERSION = "1.16.0"


def have_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


# -- TRL, in its own process ----------------------------------------------------------------------------------

def trl_worker(args) -> None:
    """One TRL GRPOTrainer run; one JSON line per step in args.out/steps.jsonl."""
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policies.hf_generation import RuleMaskProcessor
    from policies.tokenizer import GenPageTokenizer
    from rl.data import context_from_json
    from rl.reward_manager import PageJudge, load_rules

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = GenPageTokenizer.from_pretrained(args.policy)
    hf_tok = AutoTokenizer.from_pretrained(args.policy)
    rules = load_rules(args.policy, args.data)
    judge = PageJudge.from_dirs(args.data, "auto", args.policy, args.rm, args.format_weight)
    model = AutoModelForCausalLM.from_pretrained(args.policy, attn_implementation="sdpa")
    model.config.mask_logits = False  # HF generate decodes with a KV cache: the logits processor masks instead
    model.config.fallback_prob = 0.0  # as in the project's trainer (rl.config.verl_overrides): no input-id dropout in RL
    clock = {p: 0.0 for p in PHASES}
    true_rewards, violations, rewards = [], [], []

    generate = model.generate

    def masked_generate(*a, input_ids=None, attention_mask=None, **kw):
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        kw["logits_processor"] = LogitsProcessorList([RuleMaskProcessor(rules, prompts, input_ids.shape[1])])
        t = time.perf_counter()
        try:
            return generate(*a, input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            clock["generation"] += time.perf_counter() - t

    model.generate = masked_generate

    def page_reward(prompts, completions, completion_ids, extra_info, **_):
        t = time.perf_counter()
        prompt_ids = [tok.encode_context(context_from_json(i["context"])) for i in extra_info]
        j = judge.judge(prompt_ids, [list(c) for c in completion_ids], list(extra_info))
        true_rewards.append(float(np.mean(j.true)))
        rewards.append(float(np.mean(j.reward)))
        violations.append(float(np.mean([sum(v[i] for v in j.violations.values()) for i in range(len(completion_ids))])))
        clock["reward"] += time.perf_counter() - t
        return j.reward.tolist()

    class Timed(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._get_per_token_logps_and_entropies(model, *a, **kw)
            finally:
                if model is self.ref_model:
                    clock["ref_log_prob"] += time.perf_counter() - t

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            for p in clock:
                clock[p] = 0.0
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **_):
            wall = time.perf_counter() - self.t
            rec = {"step": state.global_step, "step_s": wall, **{p: clock[p] for p in ("generation", "reward", "ref_log_prob")},
                   "true_reward": true_rewards[-1], "train_reward": rewards[-1], "violations_per_page": violations[-1]}
            rec["update"] = wall - rec["generation"] - rec["reward"] - rec["ref_log_prob"]
            with open(out / "steps.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[trl] step {state.global_step}: {wall:.2f} s, true reward {rec['true_reward']:.3f}", flush=True)

    n_pages = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out / "trainer"), report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        seed=args.seed, data_seed=args.seed, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=args.grad_clip, per_device_train_batch_size=n_pages,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.max_page_tokens,
        temperature=1.0, top_k=0, top_p=1.0, beta=args.kl_coef, loss_type="dr_grpo", scale_rewards="none",
        num_iterations=1, epsilon=0.2, mask_truncated_completions=False, log_completions=False,
        dataloader_num_workers=0, disable_dropout=True, bf16=False, fp16=False,
    )
    train = datasets.Dataset.from_parquet(str(args.prompts))
    trainer = Timed(model=model, processing_class=hf_tok, reward_funcs=page_reward, args=config, train_dataset=train,
                    callbacks=[Steps()])
    trainer.train()


# -- both, side by side ---------------------------------------------------------------------------------------

def project_run(args, out: Path) -> list[dict]:
    """The project's recipe (page credit, one seed) -> its per-step records."""
    cmd = [sys.executable, "recipes/dr_grpo.py", f"data_dir={args.data}", f"policy_dir={args.policy}",
           f"rm_dir={args.rm}", f"out_dir={out}", "credit=page", f"seeds=[{args.seed}]", f"steps={args.steps}",
           f"prompts_per_step={args.prompts_per_step}", f"group_size={args.group_size}", f"lr={args.lr}",
           f"kl_coef={args.kl_coef}", f"num_threads={args.threads}", "eval_users=32"]
    run_logged(cmd, out / "stdout.log", args.threads)
    return [{"step": d["step"], "step_s": d["timing_s/step"], **{p: d.get(k, 0.0) for p, k in PROJECT_PHASES.items()},
             "true_reward": d.get("rollout/true_reward"), "train_reward": d.get("rollout/reward"),
             "violations_per_page": d.get("rules/violations/total"),
             "rollout_probs_diff_max": d.get("training/rollout_probs_diff_max")} for d in read_steps(out)]


def trl_run(args, out: Path, prompts: Path) -> list[dict]:
    cmd = [sys.executable, __file__, "--trl-worker", f"--out={out}", f"--prompts={prompts}", f"--data={args.data}",
           f"--policy={args.policy}", f"--rm={args.rm}", f"--steps={args.steps}", f"--threads={args.threads}",
           f"--prompts-per-step={args.prompts_per_step}", f"--group-size={args.group_size}", f"--lr={args.lr}",
           f"--kl-coef={args.kl_coef}", f"--grad-clip={args.grad_clip}", f"--max-page-tokens={args.max_page_tokens}",
           f"--format-weight={args.format_weight}", f"--seed={args.seed}"]
    run_logged(cmd, out / "stdout.log", args.threads)
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def run_logged(cmd: list[str], log: Path, threads: int) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (rc={rc}); its log: {log}\n{tail}")


def medians(steps: list[dict]) -> dict:
    """Median of each figure over the steps after each run's first."""
    used = [s for s in steps if s["step"] > 1]
    out = {"steps_used": len(used)}
    for k in ("step_s", "generation", "reward", "ref_log_prob", "update", "true_reward", "violations_per_page",
              "rollout_probs_diff_max"):
        vals = [s[k] for s in used if s.get(k) is not None]
        if vals:
            out[k] = float(np.median(vals))
    out["true_reward_mean"] = float(np.mean([s["true_reward"] for s in steps if s.get("true_reward") is not None]))
    return out


def budgets(args) -> None:
    """The page budget from the policy checkpoint's rules, as the recipe derives it (rl.config.sequence_lengths)."""
    if args.max_page_tokens is None:
        from rl.reward_manager import load_rules

        args.max_page_tokens = load_rules(args.policy, args.data).config.shape.max_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/world")
    ap.add_argument("--policy", default="runs/pretrain/model")
    ap.add_argument("--rm", default="runs/rm/model")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=8, help="training steps per run (the first is warm-up, not in the medians)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each trainer, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--format-weight", type=float, default=1.0)
    ap.add_argument("--max-page-tokens", type=int, default=None, help="default: the checkpoint's page budget")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    budgets(args)
    if args.trl_worker:
        trl_worker(args)
        return
    if not have_trl():
        print("TRL is not installed: `pip install -e .[bench]` (or `make bench-peers`); skipping")
        return
    work = Path(args.out) / "peers"
    runs = {"project": [], "trl": []}
    prompts = None
    for r in range(args.repeats):
        order = ("project", "trl") if r % 2 == 0 else ("trl", "project")
        for who in order:
            out = work / f"{who}_{r}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            t = time.perf_counter()
            if who == "project":
                steps = project_run(args, out)
                prompts = prompts or out / "data" / "train.parquet"
            else:  # repeat 0 runs the project first: TRL trains on the prompt rows its run wrote
                steps = trl_run(args, out, prompts)
            runs[who].append({"repeat": r, "wall_s": time.perf_counter() - t, "steps": steps})
            print(f"[peers] {who} repeat {r}: {medians(steps).get('step_s', float('nan')):.2f} s a step", flush=True)
    med = {who: medians([s for run in rs for s in run["steps"]]) for who, rs in runs.items()}
    # Generation and reward together: a streamed reward is scored inside the project's rollout, so only the sum
    # compares like for like.
    gen = {who: m.get("generation", 0.0) + m.get("reward", 0.0) for who, m in med.items()}
    ratio = {"step_s": med["project"]["step_s"] / med["trl"]["step_s"],
             "generation_with_reward": gen["project"] / gen["trl"],
             "ref_log_prob": med["project"]["ref_log_prob"] / med["trl"]["ref_log_prob"],
             "update": med["project"]["update"] / med["trl"]["update"]}
    result = {"machine": machine_load(), "trl_version": trl_version(),
              "shape": {k: getattr(args, k) for k in ("steps", "repeats", "prompts_per_step", "group_size", "lr",
                                                      "kl_coef", "grad_clip", "max_page_tokens", "threads")},
              "medians": med, "ratio_project_over_trl": ratio, "runs": runs}
    write_result(args.out, "peers", result)
    merge_summary(args.out, {"peers_step_s": {w: round(m["step_s"], 3) for w, m in med.items()},
                             "peers_step_ratio": round(ratio["step_s"], 3),
                             "peers_true_reward": {w: round(m["true_reward_mean"], 3) for w, m in med.items()}})
    print(json.dumps({"medians": med, "ratio_project_over_trl": ratio}, indent=2))


def trl_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
