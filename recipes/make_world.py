"""Stage 1: generate the homepage world and write it as a dataset directory.

    python recipes/make_world.py [--config recipes/configs/world.yaml] [--force] [key=value ...]

The simulator is one producer of datasets: it writes into `out_dir` (default runs/world) exactly what a team
brings of its own (docs/dataset.md): `dataset.yaml` (context schema, reward system, row taxonomy),
`catalog.parquet` and `logs/part-*.parquet` (docs/log_schema.md), plus `simulator/` (its hidden state: the
ground truth that `dataset.yaml` declares as its environment) and `summary.json`. Rerunning reuses what
exists; an interrupted run resumes at the first missing log part (parts are deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common.cli import clear_output_dir, lock_output_dir, parse_recipe_args, write_summary
from homepage.dataset import write_dataset
from homepage.logs import batch_to_table, read_logs
from homepage.config import MakeWorldConfig
from homepage.world import SIMULATOR_DIR, World, batch_from_table, catalog_table, dataset_schema

GROUND_TRUTH_CHUNK = 65_536  # logged pages scored by the ground truth at once (bounds the read-back's memory)


_WORLD: World | None = None  # the world and logs directory forked workers write parts of
_LOGS: Path | None = None


def _write_part(k: int, world: World | None = None, logs_dir: Path | None = None) -> int:
    """Log part k, written to a temporary name and renamed when whole (a kill leaves no half part)."""
    world, logs_dir = world or _WORLD, logs_dir or _LOGS
    batch = world.log_batch(k)
    name = f"part-{k:05d}.parquet"
    tmp = logs_dir / f".{name}.tmp"
    pq.write_table(batch_to_table(batch, world), tmp, compression="zstd")
    tmp.rename(logs_dir / name)
    return len(batch.user)


def main() -> None:
    cfg, args = parse_recipe_args(MakeWorldConfig, "recipes/configs/world.yaml", __doc__.splitlines()[1])
    out = Path(cfg.out_dir)
    logs_dir = out / "logs"

    # -- the world (reused when it exists with the same config) ------------------------------------------
    lock_output_dir(out, "make_world")  # a second run on the same directory stops here
    if args.force:
        clear_output_dir(out)
    if (out / SIMULATOR_DIR / "world.json").exists():
        world = World.load(out / SIMULATOR_DIR)
        if world.config != cfg.world:
            raise SystemExit(
                f"{out} holds a world built with a different config. Pass --force to rebuild it, or set "
                "out_dir=... to keep both."
            )
        print(f"[world] reusing {out}")
    else:
        world = World.generate(cfg.world)
        world.save(out / SIMULATOR_DIR)
        print(f"[world] generated {world.catalog.n} entities, {world.users.n} users -> {out}")

    # -- impression logs, one deterministic part per batch (resumable) -----------------------------------
    logs_dir.mkdir(parents=True, exist_ok=True)
    n_parts = -(-cfg.world.n_impressions // cfg.world.batch_size)
    existing = {p.name for p in logs_dir.glob("part-*.parquet")}
    todo = [k for k in range(n_parts) if f"part-{k:05d}.parquet" not in existing]
    t0 = time.perf_counter()
    if cfg.workers > 1 and len(todo) > 1:  # forked workers share the world copy-on-write
        import multiprocessing

        global _WORLD, _LOGS
        _WORLD, _LOGS = world, logs_dir
        with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
            counts = list(tqdm(pool.imap_unordered(_write_part, todo), total=n_parts, initial=n_parts - len(todo),
                               desc="logs", unit="part"))
    else:
        counts = [_write_part(k, world, logs_dir) for k in tqdm(todo, total=n_parts, initial=n_parts - len(todo),
                                                               desc="logs", unit="part")]
    generated = sum(counts)
    gen_seconds = time.perf_counter() - t0
    if generated:
        print(f"[logs] wrote {generated} impressions in {gen_seconds:.1f}s ({generated / gen_seconds:.0f}/s)")

    # -- the dataset's schema and public catalog (hidden taste factors stay in simulator/) -------------
    dataset = write_dataset(out, dataset_schema(world), catalog_table(world))
    c = world.catalog

    # -- read back through the validating reader, and the ground truth of the logged pages ---------------
    # The read-back table is memory-mapped from a file of the output directory (removed at the end), and the
    # ground truth runs GROUND_TRUTH_CHUNK pages at a time: memory holds a chunk of pages, not the log.
    readback = out / ".readback.arrow"
    table, report = read_logs(logs_dir, dataset.schema, known_entity_ids=frozenset(c.entity_ids), out_file=readback)
    print(f"[logs] {report.summary()}")
    true_reward, rows_per_page, entities_per_page, gt_seconds = [], [], [], 0.0
    for s in range(0, table.num_rows, GROUND_TRUTH_CHUNK):
        user, req, pages = batch_from_table(world, table.slice(s, GROUND_TRUTH_CHUNK))
        t1 = time.perf_counter()
        true_reward.append(world.true_page_reward(user, req, pages))
        gt_seconds += time.perf_counter() - t1
        rows_per_page.append((pages.rows >= 0).sum(1))
        entities_per_page.append(pages.valid.sum((1, 2)))
    true_reward, rows_per_page, entities_per_page = (np.concatenate(x) for x in (true_reward, rows_per_page,
                                                                                  entities_per_page))
    observed = table.column("page_reward").to_numpy()
    feedback = pc.value_counts(pc.list_flatten(pc.list_flatten(table.column("feedback")))).to_pylist()
    logged = {item["values"]: item["counts"] for item in feedback}
    counts = {f: int(logged.get(f, 0)) for f in dataset.schema.rewards.feedback_types}
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    summary = {
        "impressions": table.num_rows,
        "users": world.users.n,
        "entities": c.n,
        "rows": len(dataset.schema.row_ids),
        "gen_impressions_per_s": generated / gen_seconds if generated else previous.get("gen_impressions_per_s"),
        "ground_truth_pages_per_s": table.num_rows / gt_seconds,
        "logging_true_reward_mean": float(true_reward.mean()),
        "logging_observed_reward_mean": float(observed.mean()),
        "observed_vs_true_pearson": float(np.corrcoef(observed, true_reward)[0, 1]),
        "rows_per_page_mean": float(rows_per_page.mean()),
        "entities_per_page_mean": float(entities_per_page.mean()),
        "rows_viewed_mean": float(table.column("rows_viewed").to_numpy().mean()),
        "feedback_counts": counts,
        "positive_impressions": int((observed > 0).sum()),
        "unknown_entities": report.unknown_entities,
        "config": dataclasses.asdict(cfg),
    }
    del table
    readback.unlink()
    write_summary(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
