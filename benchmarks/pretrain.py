"""Benchmark: pretraining throughput (tokens/s) of the default GenPage config on this machine.

    python benchmarks/pretrain.py [--steps 30] [--world runs/world]

Times forward + backward + AdamW steps on real batches of the world's logs (after 3 warm-up steps) and
reports tokens/s (all tokens, prompt and page) and achieved FLOP/s (6 x parameters x tokens, attention
excluded). Writes runs/bench/pretrain.json and merges headline figures into runs/bench/summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from homepage.dataset import open_dataset
from policies.build import build_model
from policies.config import PretrainConfig
from policies.data import collate, encode_table, page_token_nll
from policies.tokenizer import GenPageTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--world", default="runs/world")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    cfg = PretrainConfig()
    torch.set_num_threads(cfg.num_threads)
    world = Path(args.world)
    if not (world / "dataset.yaml").exists():
        raise SystemExit(f"{world} is no dataset directory: run `python recipes/make_world.py` first")
    dataset, table, _ = open_dataset(world)
    tok = GenPageTokenizer.from_dataset(dataset, table)
    data, _ = encode_table(table.slice(0, 4000), tok, split="train", min_page_reward=0.0)
    model = build_model(tok, dataset.content(), cfg.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    rng = np.random.default_rng(0)
    times, tokens = [], []
    for step in range(args.steps + 3):
        idx = rng.choice(len(data), size=cfg.batch_size, replace=False)
        batch = collate([data.prompts[i] for i in idx], [data.pages[i] for i in idx], tok.pad_id)
        t0 = time.perf_counter()
        nll, n = page_token_nll(model, batch)
        opt.zero_grad()
        (nll / n).backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - t0)
            tokens.append(int(batch["attention_mask"].sum()))
    n_params = sum(p.numel() for p in params)
    tok_s = sum(tokens) / sum(times)
    result = {
        "steps": args.steps, "batch_size": cfg.batch_size, "parameters": n_params,
        "tokens_per_step_mean": float(np.mean(tokens)), "step_s_median": float(np.median(times)),
        "tokens_per_s": tok_s, "achieved_gflops": 6 * n_params * tok_s / 1e9,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({"pretrain_tokens_per_s": tok_s, "pretrain_step_s": result["step_s_median"]})
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
