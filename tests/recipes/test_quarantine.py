"""Bad log rows through the stages, as subprocesses on a tiny world: a log with 1% bad rows goes through pretrain
and train_rm in quarantine mode, set aside and counted, and a stage stops above max_bad_fraction. (Each recipe's
kill -9 test is in its own test module.)"""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.homepage.helpers import set_cell

pytestmark = pytest.mark.recipe

ROOT = Path(__file__).parents[2]
TINY_WORLD = ["world.n_entities=60", "world.n_users=150", "world.n_impressions=2000", "world.batch_size=250"]
TINY_MODEL = ["model.hidden_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=1",
              "model.intermediate_size=128", "batch_size=16", "eval_sequences=64", "eval_users=8", "eval_backend=hf",
              "max_new_tokens=40", "wandb_mode=offline", "num_threads=1", "cold_start_titles=0"]
TINY_RM = ["batch_size=16", "eval_sequences=100", "score_batch_size=64", "num_threads=1", "wandb_mode=offline",
           "generated_users=0", "scratch_ablation=false", "steps=10", "eval_interval=10", "checkpoint_interval=10"]


def recipe(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    proc = recipe("make_world.py", f"out_dir={out}", *TINY_WORLD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# -- quarantine -------------------------------------------------------------------------------------------------
BAD_CELLS = [  # (field, edit): values a producer bug writes; each is refused with its own reason
    ("hour", lambda v: 30),
    ("history_watch_fraction", lambda v: [7.5] * len(v)),
    ("play_minutes", lambda v: [[-1.0] * len(v[0])] + v[1:]),
    ("page_entity_ids", lambda v: [v[0], [v[0][0]] + v[1][1:]] + v[2:]),  # row 0's first title again in row 1
    ("user_id", lambda v: v + " (2)"),
]


@pytest.fixture(scope="module")
def dirty(world, tmp_path_factory) -> tuple[Path, dict]:
    """The world's dataset with 1% of the log rows broken (20 of 2000, spread over the parts), and where."""
    data = tmp_path_factory.mktemp("dirty")
    for name in ("dataset.yaml", "catalog.parquet"):
        shutil.copy(world / name, data / name)
    shutil.copytree(world / "simulator", data / "simulator")
    (data / "logs").mkdir()
    rng = random.Random(0)
    broken = {}  # (part, row) -> field
    parts = sorted((world / "logs").glob("*.parquet"))
    for k, part in enumerate(parts):
        table = pq.read_table(part)
        rows = rng.sample(range(table.num_rows), 20 // len(parts) + (k < 20 % len(parts)))
        for j, row in enumerate(rows):
            field, edit = BAD_CELLS[(k + j) % len(BAD_CELLS)]
            table = set_cell(table, field, row, edit(table.column(field)[row].as_py()))
            broken[(str(data / "logs" / part.name), row)] = field
        pq.write_table(table, data / "logs" / part.name)
    assert len(broken) == 20
    return data, broken


def assert_quarantined(out: Path, broken: dict) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_rows"]["quarantined"] == 20 and summary["bad_rows"]["rows_read"] == 2000
    assert sum(summary["bad_rows"]["by_reason"].values()) == 20
    q = pq.read_table(out / "quarantine.parquet")
    assert dict(zip(zip(q.column("part").to_pylist(), q.column("row").to_pylist()), q.column("field").to_pylist())) == broken


def test_one_percent_bad_rows_go_through_pretrain_and_train_rm_set_aside_and_counted(dirty, tmp_path):
    data, broken = dirty
    quarantine = ["on_bad_rows=quarantine", "max_bad_fraction=0.02"]
    pt = recipe("pretrain.py", f"data_dir={data}", f"out_dir={tmp_path / 'pt'}", *TINY_MODEL, "steps=10",
                "eval_interval=10", "checkpoint_interval=10", *quarantine)
    assert pt.returncode == 0, pt.stderr[-3000:]
    assert "20 bad rows quarantined" in pt.stdout
    assert_quarantined(tmp_path / "pt", broken)
    rm = recipe("train_rm.py", f"data_dir={data}", f"pretrained_dir={tmp_path / 'pt' / 'model'}",
                f"out_dir={tmp_path / 'rm'}", *TINY_RM, *quarantine)
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert_quarantined(tmp_path / "rm", broken)


@pytest.mark.parametrize("stage", ["pretrain.py", "train_rm.py"])
def test_above_max_bad_fraction_a_stage_stops_with_the_count(dirty, tmp_path, stage):
    data, _ = dirty
    extra = [f"pretrained_dir={untrained_policy(data, tmp_path / 'policy')}"] if stage == "train_rm.py" else []
    proc = recipe(stage, f"data_dir={data}", f"out_dir={tmp_path / 'out'}", "on_bad_rows=quarantine",
                  "max_bad_fraction=0.005", *extra)
    assert proc.returncode != 0
    assert "20 of 2000 rows (1.00%) are bad, more than max_bad_fraction=0.005" in proc.stderr, proc.stderr[-2000:]
    assert pq.read_table(tmp_path / "out" / "quarantine.parquet").num_rows == 20  # there to inspect


def untrained_policy(data: Path, out: Path) -> Path:
    """A tiny GenPage directory with the tokenizer of `data` (read in quarantine mode, as the stage reads it)."""
    from homepage.dataset import open_dataset
    from policies.build import ModelSize, build_model
    from policies.tokenizer import GenPageTokenizer

    dataset, table, _ = open_dataset(data, "quarantine", 1.0)
    tok = GenPageTokenizer.from_dataset(dataset, table)
    size = ModelSize(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128)
    build_model(tok, dataset.content(), size, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out
