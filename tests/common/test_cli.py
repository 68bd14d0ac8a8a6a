"""The recipe command line, stage output reuse, and the shared package's place at the bottom of the layering."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from common.cli import parse_recipe_args, reuse_or_start, write_summary
from common.config import option

ROOT = Path(__file__).parents[2]


@dataclasses.dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = option("a", "which mode")
    seeds: tuple[int, ...] = option((0, 1), "seeds")


def test_overrides_reach_the_config_and_bad_ones_exit_2(tmp_path, capsys):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("mode: b\n")
    cfg, args = parse_recipe_args(Outer, yaml_path, "test", ["--force", "seeds=[7]"])
    assert (cfg.mode, cfg.seeds, args.force) == ("b", (7,), True)
    with pytest.raises(SystemExit) as e:
        parse_recipe_args(Outer, yaml_path, "test", ["mode=z"])
    assert e.value.code == 2 and "'z' is not one of 'a', 'b'" in capsys.readouterr().err


def test_reuse_or_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("common.cli.start_reaper", lambda: None)  # not a reaper of the test session
    out = tmp_path / "stage"
    assert reuse_or_start(out, False, "stage", "summary.json") is False and out.is_dir()
    write_summary(out / "summary.json", {"b": 1, "a": [1, 2]})
    assert list(json.loads((out / "summary.json").read_text())) == ["a", "b"]  # sorted keys
    assert reuse_or_start(out, False, "stage", "summary.json", "model/config.json") is False  # model/ missing
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    assert reuse_or_start(out, False, "stage", "summary.json", "model/config.json") is True
    assert "[stage] reusing" in capsys.readouterr().out
    assert reuse_or_start(out, True, "stage", "summary.json") is False  # --force: started afresh
    assert out.is_dir() and not (out / "summary.json").exists()
    assert [p.name for p in out.iterdir()] == [".lock"]  # held by this process until it exits


def test_summary_is_replaced_whole(tmp_path):
    write_summary(tmp_path / "summary.json", {"a": 1})
    write_summary(tmp_path / "summary.json", {"a": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


LOCK_HOLDER = """
import sys, time
from common.cli import lock_output_dir
lock_output_dir(sys.argv[1], "pretrain")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_output_directory_is_refused_until_the_first_dies(tmp_path):
    import signal

    from common.cli import lock_output_dir

    out = tmp_path / "runs" / "pretrain"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"\[train_rm\] .*pretrain is in use by another run \(pid {holder.pid}, "
                                             r"pretrain\): wait for it"):
            lock_output_dir(out, "train_rm")
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with its holder: nothing stale to delete
        holder.wait()
    lock_output_dir(out, "train_rm")
    assert "train_rm" in (out / ".lock").read_text()


def test_common_imports_no_other_project_package():
    """common/ sits under every stage: importing all of it loads none of homepage, policies, reward_model, rl."""
    code = ("import importlib, pkgutil, sys\nimport common\n"
            "for m in pkgutil.iter_modules(common.__path__):\n    importlib.import_module('common.' + m.name)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    assert "common" in loaded and not loaded & {"homepage", "policies", "reward_model", "rl", "recipes"}, loaded
