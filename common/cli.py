"""The command line every recipe shares and the summary file every stage writes.

    python recipes/<stage>.py [--config FILE] [--force] [key=value ...]
    python recipes/<stage>.py --help          # every config field: type, default, help
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, TypeVar

from common.config import ConfigError, config_help, load_config

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
    """A stage's headline figures as sorted, indented JSON (summary.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def reuse_or_start(out: str | Path, force: bool, stage: str, *done: str) -> bool:
    """The stage's output directory: True when its finished outputs (`done`, paths under `out`) exist and can
    be reused; otherwise (or with --force, after deleting `out`) creates `out` and returns False."""
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    if done and all((out / d).exists() for d in done):
        print(f"[{stage}] reusing {out} (pass --force to recompute)")
        return True
    out.mkdir(parents=True, exist_ok=True)
    return False
