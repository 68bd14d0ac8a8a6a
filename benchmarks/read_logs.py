"""Reading and validating a dataset's logs (homepage.logs.read_logs) alone: rows, the validated Arrow table's
size, seconds and the process's peak memory, for the logs as they are and written as one large Parquet file.

A team's logs often come as a few large files, not the simulator's many small parts: `--one-file` rewrites the
logs into one file of `--row-group` rows per row group (`--copies K` repeats them K times with new impression
ids, to see how the costs grow with the rows) in a scratch directory. Each read runs in its own process, so its
peak RSS is its own. Figures and dates: docs/scale.md.

    python benchmarks/read_logs.py runs/world --one-file --copies 3 --scratch /tmp/read_logs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, resource, sys, time
import pyarrow as pa
from homepage.dataset import load_dataset
from homepage.logs import read_logs
ds = load_dataset(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
t0 = time.perf_counter()
table, report = read_logs(ds.logs, ds.schema)
print(json.dumps({"rows": table.num_rows, "table_mb": table.nbytes / 1e6, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "imports_rss_mb": base}))
"""


def one_file_copy(data_dir: Path, out: Path, copies: int, row_group: int) -> Path:
    """data_dir with its logs as one Parquet file (the logs `copies` times, impression ids shifted per copy)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from homepage.dataset import load_dataset
    from homepage.logs import log_parts

    dataset = load_dataset(data_dir)
    parts = log_parts(dataset.logs)
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    meta = pq.ParquetFile(parts[0]).schema_arrow.metadata
    ids = table.column("impression_id")
    shift = int(pc.max(ids).as_py()) + 1
    copies_ = [table.set_column(table.column_names.index("impression_id"), "impression_id",
                                pc.add(ids, pa.scalar(k * shift, ids.type))) for k in range(copies)]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(data_dir, out, ignore=shutil.ignore_patterns(dataset.logs.name))
    (out / dataset.logs.name).mkdir()
    pq.write_table(pa.concat_tables(copies_).replace_schema_metadata(meta), out / dataset.logs.name / "all.parquet",
                   compression="zstd", row_group_size=row_group)
    return out


def measure(data_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="a dataset directory (docs/dataset.md)")
    ap.add_argument("--one-file", action="store_true", help="also read the logs written as one Parquet file")
    ap.add_argument("--copies", type=int, default=1, help="--one-file: the logs this many times over")
    ap.add_argument("--row-group", type=int, default=300_000, help="--one-file: rows per Parquet row group")
    ap.add_argument("--scratch", type=Path, default=Path("runs/bench/read_logs"), help="where --one-file writes")
    ap.add_argument("--repeats", type=int, default=3, help="reads of each dataset (the median time is reported)")
    args = ap.parse_args()
    sets = {"as_written": args.data_dir}
    if args.one_file:
        sets["one_file"] = one_file_copy(args.data_dir, args.scratch / "one_file", args.copies, args.row_group)
    results = {}
    for name, path in sets.items():
        runs = [measure(path) for _ in range(args.repeats)]
        times = sorted(r["seconds"] for r in runs)
        results[name] = {**runs[0], "seconds": times[len(times) // 2], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        print(f"[read_logs] {name}: {results[name]['rows']:,} rows, table {results[name]['table_mb']:,.0f} MB, "
              f"{results[name]['seconds']:.2f} s (median of {args.repeats}), peak RSS {results[name]['peak_rss_mb']:,.0f} MB")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
