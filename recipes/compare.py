"""Stage 5: post-training methods side by side on the same held-out users, judged on ground truth.

    python recipes/compare.py [--config recipes/configs/compare.yaml] [--force] [key=value ...]

Each method is one or more checkpoints (one per seed): the pretrained policy, WBC (recipes/wbc.py), Dr. GRPO as
published (recipes/dr_grpo.py credit=page) and with token credit, the middle ground (the default), or any GenPage
checkpoints of yours (`methods=[name=dir_or_glob,...]`). All are judged on the same held-out data by the same
judge (rl/comparison.py): the paper's Table 1 and the masked greedy and sampled pages they write, beside the
logged pages. Writes out_dir/summary.json (per method: mean, spread and per-seed values of every figure, the
gains over the pretrained policy, the training budget from each run's summary, the entity-level and the
page-level rankings) and results.md (the table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import to_dict
from rl.comparison import compare, parse_methods, results_table
from rl.config import CompareConfig


def main() -> None:
    cfg, args = parse_recipe_args(CompareConfig, "recipes/configs/compare.yaml", __doc__.splitlines()[1])
    import torch

    torch.set_num_threads(cfg.num_threads)
    for field, need, how in (("data_dir", Path(cfg.data_dir) / "dataset.yaml", "python recipes/make_world.py"),
                             ("rm_dir", Path(cfg.rm_dir) / "config.json", "python recipes/train_rm.py")):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run `{how}` first, or point {field}=... at an existing directory")
    try:
        methods = parse_methods(cfg.methods)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    out = Path(cfg.out_dir)
    if reuse_or_start(out, args.force, "compare", "summary.json"):
        return
    t0 = time.perf_counter()
    n = sum(len(p) for p in methods.values())
    done = iter(range(1, n + 1))
    result = compare(cfg, methods, progress=lambda name, path: print(f"[compare] {next(done)}/{n} {name}: {path}", flush=True))
    table = results_table(result)
    (out / "results.md").write_text(table)
    write_summary(out / "summary.json", {**result, "wall_s": time.perf_counter() - t0, "config": to_dict(cfg)})
    print(table)
    print(json.dumps(result["rankings"]))


if __name__ == "__main__":
    main()
