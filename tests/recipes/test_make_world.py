"""Runs recipes/make_world.py as a user would (subprocess), on a tiny world."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY = ["world.n_entities=80", "world.n_users=60", "world.n_impressions=900", "world.batch_size=300"]
KEYS = {"impressions", "users", "entities", "rows", "gen_impressions_per_s", "ground_truth_pages_per_s"}


def run(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / "make_world.py"), f"out_dir={out}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    run(out)
    return out


def test_writes_a_dataset_directory_and_summary(world_dir):
    summary = json.loads((world_dir / "summary.json").read_text())
    assert KEYS <= set(summary)
    assert summary["impressions"] == 900 and summary["users"] == 60 and summary["entities"] == 80
    assert summary["gen_impressions_per_s"] > 0 and summary["ground_truth_pages_per_s"] > 0
    assert len(list((world_dir / "logs").glob("part-*.parquet"))) == 3
    assert (world_dir / "simulator" / "world.json").exists()  # the hidden state stays beside the dataset
    from homepage.dataset import open_dataset

    dataset, table, report = open_dataset(world_dir)  # the same validating path as a user's own data
    assert dataset.catalog.num_rows == 80 and table.num_rows == 900 and report.unknown_entities == 0
    assert dataset.schema.environment == "homepage.world:SimulatorEnvironment"
    assert {"latent", "quality"}.isdisjoint(pq.read_table(world_dir / "catalog.parquet").column_names)


def test_rerun_reuses_and_resumes_a_missing_part_identically(world_dir):
    part = world_dir / "logs" / "part-00001.parquet"
    before = pq.read_table(part)
    untouched = (world_dir / "logs" / "part-00000.parquet").stat().st_mtime_ns
    part.unlink()  # as if the run was interrupted before writing it
    proc = run(world_dir)
    assert "reusing" in proc.stdout and "wrote 300 impressions" in proc.stdout
    assert pq.read_table(part).equals(before)
    assert (world_dir / "logs" / "part-00000.parquet").stat().st_mtime_ns == untouched


def test_changed_config_is_refused_without_force(world_dir):
    proc = run(world_dir, "world.seed=9", check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr


def test_bad_config_value_fails_at_start_with_the_fix(tmp_path):
    proc = run(tmp_path / "w", "world.n_users=lots", check=False)
    assert proc.returncode == 2 and "world.n_users: expected int, got 'lots'" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_killed_at_a_random_point_it_resumes_to_the_same_logs(tmp_path):
    """SIGKILL while the log parts are written: the rerun keeps the parts it has (a part cut mid-write never
    got its name) and writes the rest, identical to an uninterrupted run's."""
    import random

    from tests.recipes.helpers import kill_when, outliving

    args = ["world.n_impressions=20000", "world.batch_size=100"]  # 200 parts: time to kill it among them
    run(tmp_path / "full", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "make_world.py"), f"out_dir={out}", *TINY, *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = kill_when(proc, lambda: len(list((out / "logs").glob("part-*.parquet"))) >= 2, random.uniform(0.0, 0.3))
    assert not outliving(left)
    written = len(list((out / "logs").glob("part-*.parquet")))
    assert written < 200, "the run finished before it was killed"
    again = run(out, *args)
    assert f"wrote {(200 - written) * 100} impressions" in again.stdout  # not one part redone
    for part in sorted((tmp_path / "full" / "logs").glob("part-*.parquet")):
        assert pq.read_table(out / "logs" / part.name).equals(pq.read_table(part)), part.name
    assert not list((out / "logs").glob(".*.tmp"))  # a part cut mid-write was written again
