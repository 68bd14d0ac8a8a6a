"""The command line every recipe shares and the summary file every stage writes.

    python recipes/<stage>.py [--config FILE] [--force] [key=value ...]
    python recipes/<stage>.py --help          # every config field: type, default, help
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TypeVar

from common.config import ConfigError, config_help, load_config
from common.processes import start_reaper

T = TypeVar("T")


def recipe_parser(cls: type, default_config: str | Path, description: str) -> argparse.ArgumentParser:
    """`--config FILE`, `--force` and `key=value` overrides; `--help` lists the fields of `cls`."""
    parser = argparse.ArgumentParser(description=description, epilog=config_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="recompute even if outputs exist")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (model.hidden_size=256)")
    return parser


def parse_recipe_args(cls: type[T], default_config: str | Path, description: str,
                      argv: list[str] | None = None) -> tuple[T, argparse.Namespace]:
    """Command line -> (typed config, parsed arguments). Exits with status 2 and the config error on bad values."""
    args = recipe_parser(cls, default_config, description).parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides), args
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    """A stage's headline figures as sorted, indented JSON (summary.json), written to a temporary name and
    renamed: a reader (or a rerun deciding whether to reuse the stage) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


LOCK_FILE = ".lock"
_held_locks: dict[Path, Any] = {}  # directory -> open lock file, held for the life of the process


def lock_output_dir(out: str | Path, stage: str) -> None:
    """Holds an exclusive lock on out/.lock until this process exits: a second run pointed at the same output
    directory stops with a clear error instead of interleaving its checkpoints with this one's. The kernel
    releases the lock when the process dies, kill -9 included, so there is never a stale lock to delete."""
    import fcntl

    out = Path(out).resolve()
    if out in _held_locks:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"[{stage}] {out} is in use by another run ({holder}): wait for it to finish or stop it, "
                         "or set out_dir=... to a directory of its own") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, {stage}\n")
    f.flush()
    if not _held_locks:
        atexit.register(lambda: [lock.close() for lock in _held_locks.values()])
    _held_locks[out] = f


def reuse_or_start(out: str | Path, force: bool, stage: str, *done: str) -> bool:
    """The stage's output directory: True when its finished outputs (`done`, paths under `out`) exist and can
    be reused; otherwise (or with --force, after emptying `out`) takes the directory's lock, starts the reaper
    that stops this run's processes should it be killed outright (common/processes.py), and returns False."""
    out = Path(out)
    if done and not force and all((out / d).exists() for d in done):
        print(f"[{stage}] reusing {out} (pass --force to recompute)")
        return True
    lock_output_dir(out, stage)
    if force:
        clear_output_dir(out)
    start_reaper()
    return False


def clear_output_dir(out: str | Path) -> None:
    """Deletes everything in `out` but its lock (--force)."""
    for p in Path(out).iterdir():
        if p.name != LOCK_FILE:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
