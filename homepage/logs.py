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
from tqdm import tqdm

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
    rows: int = 0  # impressions kept
    filled: dict[str, int] = field(default_factory=dict)  # optional column -> rows derived because absent
    unknown_entities: int = 0  # entity ids (page and history) not in `known_entity_ids`; kept, mapped to fallbacks
    rows_with_unknown: int = 0  # impressions holding at least one such id
    rows_read: int = 0  # impressions in the files, kept or quarantined
    quarantine: object = None  # homepage.validation.Quarantine: the rows set aside (quarantine mode)
    quarantine_file: str | None = None  # where they were written
    from_cache: bool = False  # read from the validated-logs cache an earlier stage left (homepage.dataset.cached_logs)

    @property
    def quarantined(self) -> int:
        return len(self.quarantine) if self.quarantine is not None else 0

    def bad_row_reasons(self) -> dict[str, int]:
        """'field: reason' -> quarantined rows."""
        return self.quarantine.by_reason() if self.quarantined else {}

    def bad_rows(self) -> dict:
        """What summary.json records about the rows set aside."""
        return {"rows_read": self.rows_read or self.rows, "quarantined": self.quarantined,
                "by_reason": self.bad_row_reasons(), "file": self.quarantine_file}

    def summary(self) -> str:
        text = f"{self.path}: {self.rows} impressions"
        if self.quarantined:
            text += (f"; {self.quarantined} bad rows quarantined" + (f" to {self.quarantine_file}" if
                     self.quarantine_file else "") + f" ({self.bad_row_reasons()})")
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


def batch_to_table(batch, world, policy: str | None = None) -> pa.Table:
    """A simulated `ImpressionBatch` -> Arrow table in LOG_SCHEMA (vectorized; no per-row Python). policy: the
    log's `policy` column (default: the world's logging policy)."""
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
        "policy": pa.array([policy or world.logging_policy.name] * len(u), pa.string()),
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
# Reading (the checks are in homepage/validation.py)
# ----------------------------------------------------------------------------------------------------------
def log_parts(path: str | Path) -> list[Path]:
    """The Parquet files read_logs reads: a file, or a directory's *.parquet parts in name order."""
    path = Path(path)
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


VALIDATE_BATCH_ROWS = 65_536  # rows of a part validated at once: the checks' temporaries grow with it, not the part


def _validated_parts(files: list[Path], schema, on_bad_rows: str, quarantine, seen_ids) -> Iterator[tuple[pa.Table, int]]:
    """Each part's rows in batches of VALIDATE_BATCH_ROWS, validated. -> (rows kept, rows read) per batch"""
    from homepage.validation import validate_table

    for f in files:
        try:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            version = meta.get(SCHEMA_VERSION_KEY, SCHEMA_VERSION.encode()).decode()
            if version != SCHEMA_VERSION:
                raise LogSchemaError(f"{f}: schema version {version!r}; this reader understands {SCHEMA_VERSION!r}")
            batches = pf.iter_batches(batch_size=VALIDATE_BATCH_ROWS)
        except LogSchemaError:
            raise
        except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
            raise LogSchemaError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        first, any_batch = 0, False
        while (batch := _next_batch(batches, f)) is not None or not any_batch:
            any_batch = True
            # an empty part still has its columns checked
            part = pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
            # errors name the part file and the row within it
            yield validate_table(part, f, schema, on_bad_rows, quarantine, seen_ids, first_row=first), part.num_rows
            first += part.num_rows


def _next_batch(batches: Iterator, f: Path):
    """The next record batch of part f, None at its end."""
    try:
        return next(batches, None)
    except Exception as e:  # a corrupt page or row group, found when it is decoded
        raise LogSchemaError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def output_schema(files: list[Path]) -> pa.Schema:
    """The schema of read_logs' table for these parts, known before any row is read: the LOG_SCHEMA fields the
    parts hold, in the order they first appear, with LOG_SCHEMA's types, and `split` (derived when a part lacks
    it) last unless a part holds it. Optional fields a part lacks are null in its rows."""
    names: list[str] = []
    for f in files:
        try:
            have = pq.read_schema(f).names
        except Exception:  # unreadable: _validated_parts names the file and the error
            continue
        names += [n for n in have if n in LOG_SCHEMA.names and n not in names]
    if "split" not in names:
        names.append("split")
    return pa.schema([LOG_SCHEMA.field(n) for n in names], metadata=LOG_SCHEMA.metadata)


def _conform(batch: pa.Table, layout: pa.Schema, report: LogReport, known) -> pa.Table:
    """A validated batch in the table's layout (output_schema), its unknown entity ids counted into report."""
    if "split" not in batch.column_names:
        batch = batch.append_column("split", pa.array([split_of_user(u) for u in batch.column("user_id").to_pylist()],
                                                      pa.string()))
        report.filled["split"] = report.filled.get("split", 0) + batch.num_rows
    if known is not None:
        from homepage.validation import count_unknown_entities

        ids, rows = count_unknown_entities(batch, known)
        report.unknown_entities += ids
        report.rows_with_unknown += rows
    columns = [batch.column(f.name) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
               for f in layout]
    return pa.Table.from_arrays(columns, schema=layout)


def read_logs(
    path: str | Path, schema=None, known_entity_ids: set[str] | frozenset[str] | None = None,
    on_bad_rows: str = "error", max_bad_fraction: float = 0.0, quarantine_path: str | Path | None = None,
    out_file: str | Path | None = None,
) -> tuple[pa.Table, LogReport]:
    """Reads and validates a log file (or a directory of Parquet files). Returns the table and a report.

    schema: the dataset's `DatasetSchema`; when given, values, row ids and rewards are checked against it.
    known_entity_ids: when given, ids outside it are counted in the report (and kept).
    on_bad_rows: "error" stops at the first bad row; "quarantine" sets bad rows aside (written to
    quarantine_path when given, counted by reason in the report) and stops only when more than max_bad_fraction
    of all rows are bad.
    out_file: write the valid rows there as an Arrow IPC file, batch by batch, and return the table memory-mapped
    from it: memory then holds one batch of rows, not the log (homepage.dataset.cached_logs keeps such files).
    None: the table is built in memory.
    """
    from homepage.validation import ON_BAD_ROWS, Quarantine, SeenIds

    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {list(ON_BAD_ROWS)}, got {on_bad_rows!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such log file; generate one with `python recipes/make_world.py`")
    files = log_parts(path)
    if not files:
        raise FileNotFoundError(f"{path}: directory holds no .parquet files")
    layout = output_schema(files)
    quarantine, seen_ids = Quarantine(), SeenIds()
    report = LogReport(str(path), quarantine=quarantine)
    known = pa.array(sorted(known_entity_ids), pa.string()) if known_entity_ids is not None else None
    tables, writer = [], pa.ipc.new_file(str(out_file), layout) if out_file is not None else None
    try:
        batches = _validated_parts(files, schema, on_bad_rows, quarantine, seen_ids)
        for kept, read in tqdm(batches, desc=f"validating {path}", unit=" batches", delay=2):  # shown past 2 s
            kept = _conform(kept, layout, report, known)
            report.rows += kept.num_rows
            report.rows_read += read
            if writer is not None:
                writer.write_table(kept)
            else:
                tables.append(kept)
    finally:
        if writer is not None:
            writer.close()
    if len(quarantine):
        if quarantine_path is not None:
            report.quarantine_file = str(quarantine.write(quarantine_path))
        if len(quarantine) > max_bad_fraction * report.rows_read:
            raise LogSchemaError(
                f"{path}: {len(quarantine)} of {report.rows_read} rows ({len(quarantine) / report.rows_read:.2%}) are "
                f"bad, more than max_bad_fraction={max_bad_fraction:g}; by reason: {report.bad_row_reasons()}"
                + (f"; the rows are in {report.quarantine_file}" if report.quarantine_file else "")
                + ". Fix them at the source, or raise max_bad_fraction to train on the rest")
    if writer is not None:
        return open_table(out_file), report
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0], report


def open_table(path: str | Path) -> pa.Table:
    """An Arrow IPC file's table, memory-mapped: its pages are the file's, read when touched and dropped by the
    kernel under memory pressure, so a stage's own memory does not grow with the log."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


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


def rows_where(mask) -> np.ndarray:
    """The row numbers where a boolean Arrow (chunked) array is true (null: false), without a Python object per row."""
    mask = pc.fill_null(mask, False)
    chunks = mask.chunks if isinstance(mask, pa.ChunkedArray) else [mask]
    flat = np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.zeros(0, bool)
    return np.flatnonzero(flat)


def sample_impressions(table: pa.Table, split: str, n: int, seed: int) -> list[Impression]:
    """Up to n impressions of `split` users drawn without replacement (deterministic in seed): logged contexts
    to generate for, with the logged page and feedback to compare against."""
    idx = rows_where(pc.equal(table.column("split"), split))
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
    users = pa.array(sorted({imp.context.user_id for imp in impressions}), pa.string())
    rows = rows_where(pc.is_in(table.column("user_id"), value_set=users))  # only these users' rows are read
    mine = table.select(["user_id", "split", "impression_id"]).take(rows)
    by_user: dict[tuple[str, str], list[int]] = {}
    for i, key in zip(rows.tolist(), zip(mine.column("user_id").to_pylist(), mine.column("split").to_pylist())):
        by_user.setdefault(key, []).append(i)
    pos = dict(zip(mine.column("impression_id").to_pylist(), rows.tolist()))
    other: list[int | None] = []  # per impression, the table row of the user's other page
    for imp in impressions:
        mine = pos[imp.impression_id]
        others = [r for r in by_user.get((imp.context.user_id, imp.split), []) if r != mine]
        other.append(next((r for r in others if r > mine), others[0]) if others else None)
    pages = iter(imp.page for imp in iter_impressions(table.take([r for r in other if r is not None])))
    return [next(pages) if r is not None else None for r in other]
