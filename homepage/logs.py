"""Impression logs: a versioned Parquet schema, its writer and a validating reader.

One row per impression (context, page as served, per-entity feedback, entity rewards, page reward). The
schema is documented field by field in docs/log_schema.md; `LOG_SCHEMA` below is the source of truth.
Files carry `genpage.schema_version` in their Parquet metadata. Entity and row ids are strings, so logs
from a real catalog fit as they are; ids unknown to a tokenizer are mapped to fallback tokens downstream,
never dropped (`LogReport` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from homepage.pages import Page, Row

SPLITS: tuple[str, ...] = ("train", "valid", "test")  # user-level splits; held-out users never train

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"genpage.schema_version"
PAGE_REWARD_TOLERANCE = 1e-3  # |page_reward - sum(entity_rewards)| allowed (float32 sums)

_str_list = pa.list_(pa.string())
LOG_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),  # train | valid | test; optional (derived from user_id when absent)
        pa.field("language", pa.string(), nullable=False),
        pa.field("profile_type", pa.string(), nullable=False),  # adult | kids
        pa.field("hour", pa.int8(), nullable=False),  # 0..23 local time of the request
        pa.field("day_of_week", pa.int8(), nullable=False),  # 0 = Monday .. 6 = Sunday
        pa.field("device", pa.string(), nullable=False),  # tv | mobile | web | tablet
        pa.field("history_entity_ids", _str_list, nullable=False),  # oldest first
        pa.field("history_actions", _str_list, nullable=False),  # play | binge | thumbs_up | abandon
        pa.field("history_days_ago", pa.list_(pa.float32()), nullable=False),
        pa.field("history_watch_fraction", pa.list_(pa.float32()), nullable=False),
        pa.field("page_row_ids", _str_list, nullable=False),  # rows top to bottom
        pa.field("page_entity_ids", pa.list_(_str_list), nullable=False),  # [row][column]
        pa.field("feedback", pa.list_(_str_list), nullable=False),  # [row][column] none|abandon|short_play|long_play|binge
        pa.field("play_minutes", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("thumbs_up", pa.list_(pa.list_(pa.bool_())), nullable=False),
        pa.field("entity_rewards", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("page_reward", pa.float32(), nullable=False),
        pa.field("rows_viewed", pa.int8()),  # optional: browse depth observed by the client
        pa.field("policy", pa.string()),  # optional: name of the policy that built the page
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)
OPTIONAL_FIELDS = frozenset({"split", "rows_viewed", "policy"})
HISTORY_FIELDS = ("history_entity_ids", "history_actions", "history_days_ago", "history_watch_fraction")
SLOT_FIELDS = ("feedback", "play_minutes", "thumbs_up", "entity_rewards")


class LogSchemaError(ValueError):
    """A log file or row does not follow the schema; the message names the file, row and field."""


@dataclass(frozen=True)
class HistoryAction:
    entity_id: str
    action: str  # one of users.ACTIONS
    days_ago: float
    watch_fraction: float


@dataclass(frozen=True)
class Context:
    """Everything known when the page is requested: the prompt (paper section 2)."""

    user_id: str
    language: str
    profile_type: str
    hour: int
    day_of_week: int
    device: str
    history: tuple[HistoryAction, ...]


@dataclass(frozen=True)
class Impression:
    """One logged impression. Slot fields are [row][column], aligned with `page.rows`."""

    impression_id: int
    split: str
    context: Context
    page: Page
    feedback: tuple[tuple[str, ...], ...]
    play_minutes: tuple[tuple[float, ...], ...]
    thumbs_up: tuple[tuple[bool, ...], ...]
    entity_rewards: tuple[tuple[float, ...], ...]
    page_reward: float


@dataclass
class LogReport:
    """What a reader saw besides valid rows: nothing is skipped silently."""

    path: str
    rows: int = 0
    filled: dict[str, int] = field(default_factory=dict)  # optional column -> rows derived because absent
    unknown_entities: int = 0  # entity ids (page and history) not in `known_entity_ids`; kept, mapped to fallbacks
    rows_with_unknown: int = 0  # impressions holding at least one such id

    def summary(self) -> str:
        text = f"{self.path}: {self.rows} impressions"
        if self.unknown_entities:
            text += (f"; {self.unknown_entities} unknown entity ids in {self.rows_with_unknown} impressions "
                     "(kept, mapped to fallback tokens)")
        for name, n in self.filled.items():
            text += f"; '{name}' absent, derived for {n} rows"
        return text


def split_of_user(user_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic user-level split for logs that carry none (hash of the id, stable across runs)."""
    import zlib

    x = (zlib.crc32(user_id.encode()) % 10_000) / 10_000
    return SPLITS[0] if x < fractions[0] else SPLITS[1] if x < fractions[0] + fractions[1] else SPLITS[2]


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _nested(values: np.ndarray, valid: np.ndarray, row_valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    """[B, R, L] padded values -> list<list<typ>> keeping valid slots of valid rows."""
    row_len = valid.sum(2)  # [B, R]
    inner_offsets = np.concatenate([[0], np.cumsum(row_len[row_valid])]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values[valid], type=typ))
    outer_offsets = np.concatenate([[0], np.cumsum(row_valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def _flat(values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[valid], type=typ))


def batch_to_table(batch, world) -> pa.Table:
    """A simulated `ImpressionBatch` -> Arrow table in LOG_SCHEMA (vectorized; no per-row Python)."""
    from homepage.catalog import LANGUAGES, ROW_IDS
    from homepage.rewards import FEEDBACK_TYPES
    from homepage.users import ACTIONS, DEVICES, PROFILE_TYPES

    c, us = world.catalog, world.users
    u = batch.user
    ent_ids = np.array(c.entity_ids, dtype=object)
    row_ids = np.array(ROW_IDS, dtype=object)
    pages, fb = batch.pages, batch.feedback
    valid = pages.valid
    row_valid = pages.rows >= 0
    h_valid = us.hist_entity[u] >= 0
    cols = {
        "impression_id": pa.array(batch.impression_id, pa.int64()),
        "user_id": pa.array(np.array(us.user_ids, dtype=object)[u], pa.string()),
        "split": pa.array(np.array(SPLITS, dtype=object)[us.split[u]], pa.string()),
        "language": pa.array(np.array(LANGUAGES, dtype=object)[us.language[u]], pa.string()),
        "profile_type": pa.array(np.array(PROFILE_TYPES, dtype=object)[us.profile_type[u]], pa.string()),
        "hour": pa.array(batch.requests.hour, pa.int8()),
        "day_of_week": pa.array(batch.requests.day_of_week, pa.int8()),
        "device": pa.array(np.array(DEVICES, dtype=object)[batch.requests.device], pa.string()),
        "history_entity_ids": _flat(ent_ids[np.clip(us.hist_entity[u], 0, None)], h_valid, pa.string()),
        "history_actions": _flat(np.array(ACTIONS, dtype=object)[us.hist_action[u]], h_valid, pa.string()),
        "history_days_ago": _flat(us.hist_days_ago[u], h_valid, pa.float32()),
        "history_watch_fraction": _flat(us.hist_fraction[u], h_valid, pa.float32()),
        "page_row_ids": _flat(row_ids[np.clip(pages.rows, 0, None)], row_valid, pa.string()),
        "page_entity_ids": _nested(ent_ids[np.clip(pages.entities, 0, None)], valid, row_valid, pa.string()),
        "feedback": _nested(np.array(FEEDBACK_TYPES, dtype=object)[fb.feedback], valid, row_valid, pa.string()),
        "play_minutes": _nested(fb.play_minutes, valid, row_valid, pa.float32()),
        "thumbs_up": _nested(fb.thumbs_up, valid, row_valid, pa.bool_()),
        "entity_rewards": _nested(fb.entity_rewards, valid, row_valid, pa.float32()),
        "page_reward": pa.array(fb.page_reward.astype(np.float32), pa.float32()),
        "rows_viewed": pa.array(fb.rows_viewed, pa.int8()),
        "policy": pa.array([world.logging_policy.name] * len(u), pa.string()),
    }
    return pa.Table.from_pydict(cols, schema=LOG_SCHEMA)


class LogWriter:
    """Streams tables into one Parquet file with the schema version in its metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, LOG_SCHEMA, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        names, expected = set(table.column_names), set(LOG_SCHEMA.names)
        if names != expected:
            raise LogSchemaError(
                f"{self.path}: table fields differ from the log schema: missing {sorted(expected - names)}, "
                f"extra {sorted(names - expected)}"
            )
        self._writer.write_table(table.select(LOG_SCHEMA.names).cast(LOG_SCHEMA))
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Reading and validation
# ----------------------------------------------------------------------------------------------------------
def _first_bad(mask: pa.Array | np.ndarray) -> int:
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    return int(np.flatnonzero(arr)[0])


def _check_enum(path: Path, table: pa.Table, name: str, allowed: tuple[str, ...], depth: int, key: str = "") -> None:
    col = table.column(name)
    values = col
    for _ in range(depth):
        values = pc.list_flatten(values)
    bad = pc.invert(pc.is_in(values, value_set=pa.array(allowed)))
    if pc.any(bad).as_py():
        value = values[_first_bad(bad)].as_py()
        row = _row_of_flat_value(table, name, depth, _first_bad(bad))
        raise LogSchemaError(
            f"{path}: row {row}, field '{name}': value {value!r} is not one of {list(allowed)[:30]}. "
            + (f"Map it to one of them, or add it to '{key}' in dataset.yaml (docs/dataset.md)." if key else
               "Map it to one of the allowed values (see docs/log_schema.md).")
        )


def _row_of_flat_value(table: pa.Table, name: str, depth: int, flat_index):
    """Row number(s) of the flat_index-th leaf value(s) of a (nested) list column (int or int array)."""
    col = table.column(name).combine_chunks()
    idx = flat_index
    levels = []
    arr = col
    for _ in range(depth):
        levels.append(arr)
        arr = arr.flatten()
    for level in reversed(levels):
        offsets = level.offsets.to_numpy() - level.offsets[0].as_py()
        idx = np.searchsorted(offsets, idx, side="right") - 1
    return int(idx) if np.ndim(idx) == 0 else idx


def _list_lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def validate_table(table: pa.Table, path: str | Path = "<table>", schema=None) -> LogReport:
    """Checks a log table row by row against LOG_SCHEMA and, when given, the dataset's schema
    (`homepage.dataset.DatasetSchema`: closed context vocabularies, action and feedback types, row ids, the
    reward system); raises LogSchemaError on the first bad row/field."""
    path = Path(path)
    report = LogReport(str(path), rows=table.num_rows)
    names = set(table.column_names)
    for f in LOG_SCHEMA:
        if f.name not in names and f.name not in OPTIONAL_FIELDS:
            raise LogSchemaError(
                f"{path}: missing required field '{f.name}' (type {f.type}). Every impression needs it; "
                "see docs/log_schema.md."
            )
        if f.name in names and not table.schema.field(f.name).type.equals(f.type):
            have = table.schema.field(f.name).type
            try:
                table = table.set_column(table.column_names.index(f.name), f.name, table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise LogSchemaError(
                    f"{path}: field '{f.name}' has type {have}, expected {f.type}; convert the column before writing"
                ) from None
        if f.name in names and not f.nullable and table.column(f.name).null_count:
            row = _first_bad(pc.is_null(table.column(f.name)))
            raise LogSchemaError(f"{path}: row {row}, field '{f.name}': missing value (null); every row needs one")
    extra = sorted(names - {f.name for f in LOG_SCHEMA})
    if extra:
        raise LogSchemaError(f"{path}: unknown field(s) {extra}; remove them or check the spelling (docs/log_schema.md)")

    # Scalars.
    for name, lo, hi in (("hour", 0, 23), ("day_of_week", 0, 6)):
        v = table.column(name).to_numpy()
        bad = (v < lo) | (v > hi)
        if bad.any():
            r = _first_bad(bad)
            raise LogSchemaError(f"{path}: row {r}, field '{name}': {int(v[r])} is outside {lo}..{hi}")
    if "split" in names:
        _check_enum(path, table, "split", SPLITS, 0)
    if schema is not None:
        for name, vocab in schema.context.items():
            if vocab.closed:
                _check_enum(path, table, name, vocab.values, 0, "context." + name)
        if schema.actions.closed:
            _check_enum(path, table, "history_actions", schema.actions.values, 1, "history.actions")
        _check_enum(path, table, "feedback", schema.rewards.feedback_types, 2, "rewards.feedback")
        _check_enum(path, table, "page_row_ids", schema.row_ids, 1, "rows")

    # History lists are parallel.
    h_len = _list_lengths(table.column("history_entity_ids"))
    for name in HISTORY_FIELDS[1:]:
        bad = _list_lengths(table.column(name)) != h_len
        if bad.any():
            r = _first_bad(bad)
            raise LogSchemaError(
                f"{path}: row {r}, field '{name}': {int(_list_lengths(table.column(name))[r])} values but "
                f"history_entity_ids has {int(h_len[r])}; history lists must be parallel"
            )
    # Page structure: at least one row, no empty row, slot fields aligned with page_entity_ids.
    n_rows = _list_lengths(table.column("page_row_ids"))
    if (n_rows == 0).any():
        r = _first_bad(n_rows == 0)
        raise LogSchemaError(f"{path}: row {r}, field 'page_row_ids': a page needs at least one row")
    if (_list_lengths(table.column("page_entity_ids")) != n_rows).any():
        r = _first_bad(_list_lengths(table.column("page_entity_ids")) != n_rows)
        raise LogSchemaError(
            f"{path}: row {r}, field 'page_entity_ids': {int(_list_lengths(table.column('page_entity_ids'))[r])} "
            f"rows of entities but page_row_ids names {int(n_rows[r])} rows"
        )
    ent_inner = pc.list_value_length(pc.list_flatten(table.column("page_entity_ids"))).to_numpy(zero_copy_only=False)
    if (ent_inner == 0).any():
        r = _row_of_flat_value(table, "page_entity_ids", 1, _first_bad(ent_inner == 0))
        raise LogSchemaError(f"{path}: row {r}, field 'page_entity_ids': a row of the page has no entities")
    for name in SLOT_FIELDS:
        if name not in names:
            continue
        col = table.column(name)
        outer_bad = _list_lengths(col) != n_rows
        if outer_bad.any():
            r = _first_bad(outer_bad)
        else:  # same rows per page, so the per-row lengths line up one to one
            inner_bad = pc.list_value_length(pc.list_flatten(col)).to_numpy(zero_copy_only=False) != ent_inner
            r = _row_of_flat_value(table, name, 1, _first_bad(inner_bad)) if inner_bad.any() else -1
        if r >= 0:
            raise LogSchemaError(
                f"{path}: row {r}, field '{name}': its [row][column] shape differs from page_entity_ids; "
                "give one value per shown entity"
            )
    # Rewards: entity rewards must add up to the page reward.
    flat_rewards = pc.list_flatten(pc.list_flatten(table.column("entity_rewards"))).to_numpy(zero_copy_only=False)
    if not np.isfinite(flat_rewards).all():
        r = _row_of_flat_value(table, "entity_rewards", 2, _first_bad(~np.isfinite(flat_rewards)))
        raise LogSchemaError(f"{path}: row {r}, field 'entity_rewards': non-finite reward")
    per_page = _list_lengths(table.column("entity_rewards"))  # rows per page
    slots_per_page = np.add.reduceat(ent_inner, np.concatenate([[0], np.cumsum(per_page)[:-1]])) if len(per_page) else per_page
    sums = np.add.reduceat(flat_rewards, np.concatenate([[0], np.cumsum(slots_per_page)[:-1]])) if len(per_page) else per_page
    page_reward = table.column("page_reward").to_numpy()
    bad = np.abs(sums - page_reward) > PAGE_REWARD_TOLERANCE * np.maximum(1.0, np.abs(page_reward))
    if bad.any():
        r = _first_bad(bad)
        raise LogSchemaError(
            f"{path}: row {r}, field 'page_reward': {float(page_reward[r]):.4f} but entity_rewards sum to "
            f"{float(sums[r]):.4f}; page reward must be the sum of entity rewards (paper section 3)"
        )
    if schema is not None:
        rewards = schema.rewards
        flat_fb = pc.list_flatten(pc.list_flatten(table.column("feedback")))
        codes = pc.index_in(flat_fb, value_set=pa.array(rewards.feedback_types)).to_numpy(zero_copy_only=False)
        thumbs = pc.list_flatten(pc.list_flatten(table.column("thumbs_up"))).to_numpy(zero_copy_only=False)
        expect = rewards.values()[codes.astype(np.int64)] + rewards.thumbs_up * thumbs.astype(np.float64)
        bad = np.abs(expect - flat_rewards) > 1e-4
        if bad.any():
            r = _row_of_flat_value(table, "entity_rewards", 2, _first_bad(bad))
            raise LogSchemaError(
                f"{path}: row {r}, field 'entity_rewards': does not follow the reward system for its feedback "
                f"(expected {float(expect[_first_bad(bad)])}, found {float(flat_rewards[_first_bad(bad)])}); the "
                "reward table in dataset.yaml ('rewards') must be the one the logs were scored with"
            )
    return report


def count_unknown_entities(table: pa.Table, known_entity_ids: set[str] | frozenset[str]) -> tuple[int, int]:
    """(unknown entity ids, impressions holding one) over page and history entity ids."""
    known = pa.array(sorted(known_entity_ids), pa.string())
    total, rows = 0, np.zeros(table.num_rows, dtype=bool)
    for depth, name in ((2, "page_entity_ids"), (1, "history_entity_ids")):
        flat = table.column(name)
        for _ in range(depth):
            flat = pc.list_flatten(flat)
        unknown = pc.invert(pc.is_in(flat, value_set=known)).to_numpy(zero_copy_only=False)
        total += int(unknown.sum())
        if unknown.any():
            rows[_row_of_flat_value(table, name, depth, np.flatnonzero(unknown))] = True
    return total, int(rows.sum())


def read_logs(
    path: str | Path, schema=None, known_entity_ids: set[str] | frozenset[str] | None = None
) -> tuple[pa.Table, LogReport]:
    """Reads and validates a log file (or a directory of Parquet files). Returns the table and a report.

    schema: the dataset's `DatasetSchema`; when given, values, row ids and rewards are checked against it.
    known_entity_ids: when given, ids outside it are counted in the report (and kept).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such log file; generate one with `python recipes/make_world.py`")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: directory holds no .parquet files")
    tables = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise LogSchemaError(f"{f}: not a readable Parquet file ({e})") from e
        meta = pf.schema_arrow.metadata or {}
        version = meta.get(SCHEMA_VERSION_KEY, SCHEMA_VERSION.encode()).decode()
        if version != SCHEMA_VERSION:
            raise LogSchemaError(f"{f}: schema version {version!r}; this reader understands {SCHEMA_VERSION!r}")
        part = pf.read()
        validate_table(part, f, schema)  # errors name the part file and the row within it
        tables.append(part)
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    report = LogReport(str(path), rows=table.num_rows)
    if "split" not in table.column_names:
        splits = [split_of_user(u) for u in table.column("user_id").to_pylist()]
        table = table.append_column("split", pa.array(splits, pa.string()))
        report.filled["split"] = table.num_rows
    if known_entity_ids is not None:
        report.unknown_entities, report.rows_with_unknown = count_unknown_entities(table, known_entity_ids)
    return table, report


def iter_impressions(table: pa.Table) -> Iterator[Impression]:
    """Structured impressions from a validated table (Python objects: for tokenization and inspection)."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    for i in range(table.num_rows):
        history = tuple(
            HistoryAction(e, a, float(d), float(w))
            for e, a, d, w in zip(*(cols[n][i] for n in HISTORY_FIELDS))
        )
        ctx = Context(
            cols["user_id"][i], cols["language"][i], cols["profile_type"][i], int(cols["hour"][i]),
            int(cols["day_of_week"][i]), cols["device"][i], history,
        )
        page = Page(tuple(Row(r, tuple(e)) for r, e in zip(cols["page_row_ids"][i], cols["page_entity_ids"][i])))
        yield Impression(
            impression_id=int(cols["impression_id"][i]),
            split=cols["split"][i] if "split" in cols else split_of_user(cols["user_id"][i]),
            context=ctx,
            page=page,
            feedback=tuple(tuple(x) for x in cols["feedback"][i]),
            play_minutes=tuple(tuple(x) for x in cols["play_minutes"][i]),
            thumbs_up=tuple(tuple(x) for x in cols["thumbs_up"][i]),
            entity_rewards=tuple(tuple(x) for x in cols["entity_rewards"][i]),
            page_reward=float(cols["page_reward"][i]),
        )


def sample_impressions(table: pa.Table, split: str, n: int, seed: int) -> list[Impression]:
    """Up to n impressions of `split` users drawn without replacement (deterministic in seed): logged contexts
    to generate for, with the logged page and feedback to compare against."""
    idx = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == split)
    if len(idx) > n:
        idx = np.sort(np.random.default_rng([seed, 31]).choice(idx, size=n, replace=False))
    return list(iter_impressions(table.take(idx)))


def engaged_titles(impression: Impression) -> set[str]:
    """Titles of the logged page with a positive entity reward."""
    return {e for row, rewards in zip(impression.page.rows, impression.entity_rewards)
            for e, r in zip(row.entity_ids, rewards) if r > 0}


def other_page_of_user(impressions: list[Impression], table: pa.Table) -> list[Page | None]:
    """Per impression, a logged page the same user got in another impression of `table` in the same split (the
    next one in log order), None if there is none: what the logging policy shows the user, without the page
    that produced the engagement being scored (the logging policy's offline recall)."""
    by_user: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(table.column("user_id").to_pylist(), table.column("split").to_pylist())):
        by_user.setdefault(key, []).append(i)
    pos = {int(v): i for i, v in enumerate(table.column("impression_id").to_numpy())}
    other: list[int | None] = []  # per impression, the table row of the user's other page
    for imp in impressions:
        mine = pos[imp.impression_id]
        others = [r for r in by_user.get((imp.context.user_id, imp.split), []) if r != mine]
        other.append(next((r for r in others if r > mine), others[0]) if others else None)
    pages = iter(imp.page for imp in iter_impressions(table.take([r for r in other if r is not None])))
    return [next(pages) if r is not None else None for r in other]
