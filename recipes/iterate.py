"""Stage 6: iterated rounds of post-training: serve the RL policy, log, retrain the reward model, RL again.

    python recipes/iterate.py [--config recipes/configs/iterate.yaml] [--force] [key=value ...]

Round 1 is a Dr. GRPO run on the dataset's own logs (first_round_dir, the demo's runs/dr_grpo; trained here when
missing). Each later round, for each seed's chain: the chain's policy serves fresh requests of train-split users
under the business-rule masks (a share of them at a hotter temperature, as the logging policy explores), the
environment's users browse the pages and the outcomes become a new log part; the reward model is retrained on
all the logs the chain has (python recipes/train_rm.py) and Dr. GRPO runs again from the served policy (python
recipes/dr_grpo.py). With refresh_rm=false the same rounds of RL run on round 1's reward model: the control.
Every round is judged on the same held-out users (rl/iteration.py). Each step reuses its outputs when they
exist, so a killed run resumes at the step it was in.

Writes out_dir/: round_<r>/seed_<s>/ (logs/, data/, rm/, dr_grpo/, served.json), results.md, rounds.png and
summary.json (per round: true reward and its gain, RM reward and the RM-truth gap, diversity, violations,
what the served pages earned; per chain the same).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import to_dict
from rl.config import IterateConfig
from rl.iteration import aggregate, link_dataset, plot_rounds, results_table, round_figures, serve_round

RECIPES = Path(__file__).parent
# The environment every stage runs in: taken before this process starts a vLLM engine, which sets variables of its
# own (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) that a verl run started under them dies of.
STAGE_ENV = dict(os.environ)


def stage(script: str, *overrides: str) -> dict:
    """Runs a recipe to completion (it reuses its finished outputs) -> its summary.json."""
    cmd = [sys.executable, str(RECIPES / script), *overrides]
    print(f"[iterate] {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, env=STAGE_ENV).returncode
    if rc != 0:
        raise SystemExit(f"[iterate] failed with exit status {rc}: {' '.join(cmd[1:])} (rerun python recipes/iterate.py "
                         "to resume)")
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("out_dir="))
    return json.loads((Path(out) / "summary.json").read_text())


def first_round(cfg: IterateConfig) -> dict:
    """Round 1's Dr. GRPO summary (trained when first_round_dir holds none), checked to be a run of cfg's
    seeds from cfg's policy on cfg's data."""
    first = Path(cfg.first_round_dir)
    summary = stage("dr_grpo.py", f"data_dir={cfg.data_dir}", f"environment={cfg.environment}",
                    f"policy_dir={cfg.pretrained_dir}", f"rm_dir={cfg.rm_dir}", f"out_dir={first}",
                    f"seeds=[{','.join(map(str, cfg.seeds))}]", *cfg.dr_grpo_args)
    ran = summary["config"]
    for key, want in (("data_dir", cfg.data_dir), ("policy_dir", cfg.pretrained_dir), ("rm_dir", cfg.rm_dir)):
        if Path(ran[key]).resolve() != Path(want).resolve():
            raise SystemExit(f"{first} was trained with {key}={ran[key]}, not {want}: point first_round_dir=... at "
                             "a run on the same inputs, or pass --force to a fresh one")
    missing = sorted(set(cfg.seeds) - set(ran["seeds"]))
    if missing:
        raise SystemExit(f"{first} has no seed(s) {missing}: set seeds=[{','.join(map(str, ran['seeds']))}] or "
                         "train them there")
    if "true_reward_pretrained" not in summary:
        raise SystemExit(f"{first}: no true reward (no environment); iterated rounds are judged on ground truth")
    return summary


def next_impression_id(logs: list[Path]) -> int:
    """One past the largest impression id of the given log parts (impression ids are unique across parts)."""
    import pyarrow.parquet as pq

    return max(int(pq.read_table(p, columns=["impression_id"]).column(0).to_numpy().max()) for p in logs) + 1


def main() -> None:
    cfg, args = parse_recipe_args(IterateConfig, "recipes/configs/iterate.yaml", __doc__.splitlines()[1])
    for field, need, how in (("data_dir", Path(cfg.data_dir) / "dataset.yaml", "python recipes/make_world.py"),
                             ("pretrained_dir", Path(cfg.pretrained_dir) / "config.json", "python recipes/pretrain.py"),
                             ("rm_dir", Path(cfg.rm_dir) / "config.json", "python recipes/train_rm.py")):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run `{how}` first, or point {field}=... at an existing directory")
    from homepage.dataset import load_dataset
    from homepage.environment import load_environment

    env = load_environment(cfg.environment, load_dataset(cfg.data_dir))
    if env is None:
        raise SystemExit(f"{cfg.data_dir} has no environment (environment=auto finds none): a round serves the policy "
                         "to users and logs what they do, and is judged on the true reward; give one as "
                         "environment=module:Class")
    missing = [m for m in ("sample_contexts", "log_impressions") if cfg.refresh_rm and not hasattr(env, m)]
    if missing:  # checked before round 1, not after it
        raise SystemExit(f"the environment {type(env).__name__} has no {' or '.join(missing)} (homepage.environment): "
                         "it cannot serve a round's pages; serve the policy online and add its logs to the dataset "
                         "directory, or run refresh_rm=false")
    out = Path(cfg.out_dir)
    if reuse_or_start(out, args.force, "iterate", "summary.json"):
        return
    t0 = time.perf_counter()

    # -- round 1: Dr. GRPO on the dataset's own logs and reward model ----------------------------------------
    summary1 = first_round(cfg)
    rounds = {1: {s: round_figures(summary1, s) for s in cfg.seeds}}
    policy = {s: Path(cfg.first_round_dir) / f"seed_{s}" / "model" for s in cfg.seeds}
    parts: dict[int, list[Path]] = {s: [] for s in cfg.seeds}
    base_logs = sorted((Path(cfg.data_dir) / "logs").glob("*.parquet"))

    # -- rounds 2..R, each chain on its own ----------------------------------------------------------------
    for r in range(2, cfg.rounds + 1):
        rounds[r] = {}
        for s in cfg.seeds:
            run = out / f"round_{r}" / f"seed_{s}"
            data, rm_dir = Path(cfg.data_dir), Path(cfg.rm_dir)
            served = None
            if cfg.refresh_rm:
                # 1-2. serve the chain's policy, log what the users did (one part, written once whole)
                part = run / "logs" / f"part-r{r:02d}-s{s}.parquet"
                if not (run / "served.json").exists():
                    import pyarrow.parquet as pq

                    print(f"[iterate] round {r} seed {s}: {policy[s]} serves {cfg.impressions_per_round} requests",
                          flush=True)
                    t = time.perf_counter()
                    table, served = serve_round(
                        policy[s], env, cfg.impressions_per_round, seed=1000 * r + s,
                        first_id=next_impression_id(base_logs + parts[s]), policy_name=f"genpage_round{r - 1}_seed{s}",
                        temperature=cfg.temperature, explore_fraction=cfg.explore_fraction,
                        explore_temperature=cfg.explore_temperature, max_new_tokens=cfg.max_new_tokens)
                    part.parent.mkdir(parents=True, exist_ok=True)
                    tmp = part.with_name(f".{part.name}.tmp")
                    pq.write_table(table, tmp, compression="zstd")
                    tmp.rename(part)
                    served["serve_s"] = time.perf_counter() - t
                    write_summary(run / "served.json", served)
                served = json.loads((run / "served.json").read_text())
                print(f"[iterate] round {r} seed {s}: served {served['served']} pages (not served: "
                      f"{served['not_served']}), true reward {served['true_reward']:.3f}", flush=True)
                parts[s].append(part)
                # 3-4. all the chain's logs as one dataset directory; the reward model retrained on them
                data = link_dataset(cfg.data_dir, parts[s], run / "data")
                rm = stage("train_rm.py", f"data_dir={data}", f"environment={cfg.environment}",
                           f"pretrained_dir={cfg.pretrained_dir}", f"out_dir={run / 'rm'}", f"seed={s}",
                           f"num_threads={cfg.num_threads}", f"wandb_mode={cfg.wandb_mode}", *cfg.rm_args)
                rm_dir = run / "rm" / "model"
            # 5. Dr. GRPO from the chain's policy (also the KL reference) on the round's reward model
            rl = stage("dr_grpo.py", f"data_dir={data}", f"environment={cfg.environment}", f"policy_dir={policy[s]}",
                       f"rm_dir={rm_dir}", f"out_dir={run / 'dr_grpo'}", f"seeds=[{s}]", f"prompt_seed={r}",
                       f"num_threads={cfg.num_threads}", f"wandb_mode={cfg.wandb_mode}", *cfg.dr_grpo_args)
            rounds[r][s] = round_figures(rl, s)
            rounds[r][s]["served"] = served
            rounds[r][s]["rm"] = {"gt_pairwise_acc_logged": rm.get("gt_pairwise_acc_logged"),
                                  "train_s": rm.get("train_s")} if cfg.refresh_rm else None
            rounds[r][s]["wall_s"] = rl.get("wall_s")
            policy[s] = run / "dr_grpo" / f"seed_{s}" / "model"

    # -- the rounds side by side ---------------------------------------------------------------------------
    pre, logging = summary1["true_reward_pretrained"], summary1.get("true_reward_logging")
    rows = aggregate(rounds, pre)
    table = results_table(rows, pre, logging)
    (out / "results.md").write_text(f"# Iterated rounds (refresh_rm={str(cfg.refresh_rm).lower()})\n\n{table}")
    plot_rounds(rounds, pre, out / "rounds.png")
    last = rows[-1]
    write_summary(out / "summary.json", {
        "true_reward_pretrained": pre, "true_reward_logging": logging,
        "true_reward_final": last["true_reward"]["mean"], "true_reward_gain_final": last["true_reward_gain"]["mean"],
        "true_reward_gain_final_std": last["true_reward_gain"]["std"],
        "rm_truth_gap_per_round": [row["rm_truth_gap"]["mean"] for row in rows],
        "true_reward_gain_per_round": [row["true_reward_gain"]["mean"] for row in rows],
        "mask_violations": int(sum(f["end"]["mask_violations"] for by_seed in rounds.values() for f in by_seed.values())),
        "rounds": rows, "per_seed": {str(s): {str(r): rounds[r][s] for r in rounds} for s in cfg.seeds},
        "wall_s": time.perf_counter() - t0, "config": to_dict(cfg)})
    print(table)


if __name__ == "__main__":
    sys.exit(main())
