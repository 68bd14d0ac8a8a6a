"""Typed recipe configs on OmegaConf structured configs: a YAML file plus `key=value` overrides (OmegaConf's
dotlist syntax, the one verl users know: `model.hidden_size=256`, `seeds=[0,1]`) -> a frozen dataclass.

A config is a plain dataclass whose fields carry their help text (`option(default, "what it is for")`), so
`--help` (`config_help`) and the loader read one source. OmegaConf checks names and scalar types; this module
adds what OmegaConf's structured configs do not support: `Literal` choices (checked here, listed in errors),
tuples (OmegaConf hands lists back) and frozen dataclasses built through their `__post_init__` validation.

    cfg = load_config(PretrainConfig, "recipes/configs/pretrain.yaml", ["steps=100", "model.hidden_size=256"])
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's fields; the message says which and how."""


WandbMode = Literal["offline", "online", "disabled"]  # wandb.init(mode=...): offline needs no account
OnBadRows = Literal["error", "quarantine"]  # what the log reader does with a row that fails validation


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A config field with its help text (shown by `--help`): `steps: int = option(500, "optimizer steps")`.
    factory: for mutable or nested defaults (`option(factory=ModelSize, help=...)`)."""
    if not help:
        raise TypeError("option(...) needs help: one sentence saying what the field is for")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """The fields every training stage's config shares (each stage's config extends it): the dataset directory,
    its ground truth, threads and wandb. They come first in `--help`."""

    data_dir: str = option("runs/world", "dataset directory (docs/dataset.md): catalog, schema and logs; "
                           "recipes/make_world.py writes the toy one")
    environment: str = option("auto", "ground truth for the true_* / gt_* figures: auto (the dataset's own, if it "
                              "declares one), '' (none: offline metrics only), or a dotted path module:Class")
    num_threads: int = option(2, "torch intra-op threads per process")
    wandb_project: str = option("genpage", "wandb project name")
    wandb_mode: WandbMode = option("offline", "offline (no account needed), online, or disabled")
    on_bad_rows: OnBadRows = option("error", "a log row that fails validation: 'error' stops at the first one (naming "
                                    "file, row and field); 'quarantine' sets bad rows aside in out_dir/"
                                    "quarantine.parquet, counts them by reason in summary.json and goes on")
    max_bad_fraction: float = option(0.01, "quarantine mode: stop when more than this share of the rows is bad "
                                     "(a producer bug, not a few bad rows)")
    logs_cache_dir: str = option("runs/cache/logs", "validated logs as a memory-mapped Arrow file, shared by every "
                                 "stage on the same dataset and bad-row policy (keyed by both and the validating code: "
                                 "a change validates again); '' to validate into memory")
    cache_dir: str = option("runs/cache/encoded", "encoded impressions, memory-mapped and shared by every stage on "
                            "the same logs and tokenizer (keyed by both: a change re-encodes); '' to encode in memory")


# -- the OmegaConf schema of a dataclass ------------------------------------------------------------------------

def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None` / `Optional[X]`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _schema_type(tp: Any) -> Any:
    """The type OmegaConf validates for a field of type `tp` (Literal -> str: the choice is checked later)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return typing.Optional[_schema_type(inner)]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(set(args)) > 1:
            return typing.List[Any]
        return typing.List[_schema_type(args[0]) if args else Any]
    if origin is dict:
        key, value = typing.get_args(tp) or (str, Any)
        return typing.Dict[key, _schema_type(value)]
    if tp is dict:
        return typing.Dict[str, Any]
    if dataclasses.is_dataclass(tp):
        return _schema(tp)
    return tp


@functools.cache
def _schema(cls: type) -> type:
    """A mirror dataclass of `cls` that OmegaConf accepts: same fields and defaults (as plain data), schema
    types. The real class is built afterwards (`_build`), so its own validation runs."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _schema_type(hints[f.name]), dataclasses.field(default_factory=lambda f=f: _plain(_field_default(f), schema=True)))
              for f in dataclasses.fields(cls) if f.init]
    return dataclasses.make_dataclass(cls.__name__, fields)  # named as cls: OmegaConf's messages name it


def _field_default(f: dataclasses.Field) -> Any:
    """The default value of field `f` (its factory called), MISSING where it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _plain(value: Any, schema: bool = False) -> Any:
    """A value as OmegaConf data: tuples as lists, nested configs as dicts or (schema) as schema instances."""
    if dataclasses.is_dataclass(value):
        fields = {f.name: _plain(getattr(value, f.name), schema) for f in dataclasses.fields(value) if f.init}
        return _schema(type(value))(**fields) if schema else fields
    if isinstance(value, (tuple, list)):
        return [_plain(v, schema) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, schema) for k, v in value.items()}
    return value


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default as plain data (MISSING where it has none)."""
    return {f.name: _plain(_field_default(f)) for f in dataclasses.fields(cls) if f.init}


# -- building the real dataclass --------------------------------------------------------------------------------

def _build(tp: Any, value: Any, where: str) -> Any:
    """OmegaConf's checked container value -> the value of type `tp` (tuples, Literal choices, dataclasses)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _build(inner, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_build(args[min(i, len(args) - 1)] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
    return value


def _load(cls: type[T], layers: list[Any], where: str) -> T:
    """Merges `layers` (dicts or DictConfigs) over the defaults of `cls`, checks them and builds `cls`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(_schema(cls)), *layers)
        data = OmegaConf.to_container(merged, throw_on_missing=True)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or "?"
        section = _section(cls, key)
        raise ConfigError(f"{where}: unknown key {key!r}; known keys{' of ' + section.__name__ if section is not cls else ''}: "
                          f"{', '.join(known_keys(section))}") from None
    except ValidationError as e:  # a value OmegaConf cannot convert to the field's type
        key = getattr(e, "full_key", None) or "?"
        tp = typing.get_type_hints(_section(cls, key)).get(key.split(".")[-1].split("[")[0])
        expected = _type_name(tp) if tp is not None else "another type"
        raise ConfigError(f"{where}: {key}: expected {expected}, got {getattr(e, 'value', None)!r}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
    return _build(cls, data, where)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` <- YAML file `path` (optional) <- `key=value` overrides -> a validated `cls`."""
    layers: list[Any] = []
    where = str(path) if path is not None else "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of {cls.__name__} fields at the top level")
        layers.append(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. steps=100")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"overrides {overrides}: {str(e).splitlines()[0]}") from None
        where += " + overrides"
    return _load(cls, layers, where)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Builds `cls` from a (nested) dict, e.g. a config saved in a checkpoint, with the same checks."""
    return _load(cls, [data], where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (JSON-ready: tuples as lists)."""
    return _plain(cfg)


def known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _section(cls: type, dotted: str) -> type:
    """The (nested) config class that holds the last key of `dotted`."""
    for key in dotted.split(".")[:-1]:
        tp = typing.get_type_hints(cls).get(key)
        tp = _optional_inner(tp) or tp
        if not dataclasses.is_dataclass(tp):
            break
        cls = tp
    return cls


# -- help --------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list[{', '.join(_type_name(a) for a in args) or 'any'}]"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


SECTION = "<section>"  # the default shown for a nested config: its own fields follow it


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) of every field of `cls`, nested dataclasses expanded after their row."""
    hints = typing.get_type_hints(cls)
    defaults = _defaults(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        name = prefix + f.name
        section = _optional_inner(tp) or tp
        if dataclasses.is_dataclass(section):  # a nested config: its row, then its own fields
            optional = section is not tp
            rows.append((name, section.__name__ + (" | None" if optional else ""),
                         defaults[f.name] if optional else SECTION, f.metadata.get("help", "")))
            rows += config_fields(section, name + ".")
        else:
            rows.append((name, _type_name(tp), defaults[f.name], f.metadata.get("help", "")))
    return rows


def config_help(cls: type) -> str:
    """Every field of `cls`: `name  (type, default)  help`, for `--help`."""
    lines = [f"{cls.__name__} fields (override with key=value; nested keys dotted):"]
    for name, tp, default, text in config_fields(cls):
        shown = "" if default is SECTION else f", default {default!r}"
        lines.append(f"  {name}  ({tp}{shown})")
        lines.append(f"      {text}")
    return "\n".join(lines)
