"""Small helpers the recipes share: command-line parsing into typed configs and summary files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from homepage.config import ConfigError, load_config

T = TypeVar("T")


def parse_recipe_args(cls: type[T], default_config: str | Path, description: str, argv: list[str] | None = None) -> tuple[T, argparse.Namespace]:
    """`--config FILE` plus `key=value` overrides -> typed config. Exits with the config error on bad values."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="recompute even if outputs exist")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (world.n_users=500)")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides), args
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
