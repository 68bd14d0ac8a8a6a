"""Row checks of impression logs, and the quarantine of the rows that fail them (docs/log_schema.md).

Every check refuses rows with the field and a reason. With `on_bad_rows="error"` the first refused row stops the
read (`LogSchemaError` naming the file, the row and the field); with `"quarantine"` refused rows are set aside in
a `Quarantine` (written as Parquet by `Quarantine.write`, counted by reason in the report) and the read goes on
with the rest, until more than `max_bad_fraction` of the rows are refused. A row is refused once, by the first
check it fails: checks run in order and each sees only the rows that passed the ones before it, so a later check
can rely on the shapes an earlier one enforced. File-level faults (an unreadable file, another schema version, a
missing, mistyped or unknown column) concern every row and always stop the read.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
import typing
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.config import OnBadRows
from homepage.logs import (HISTORY_FIELDS, LOG_SCHEMA, OPTIONAL_FIELDS, PAGE_REWARD_TOLERANCE, SLOT_FIELDS, SPLITS,
                           LogSchemaError)

ON_BAD_ROWS: tuple[str, ...] = typing.get_args(OnBadRows)
ENTITY_REWARD_TOLERANCE = 1e-4  # |entity reward - reward system's value| allowed (float32 logs)
ID_FIELDS = (("user_id", 0), ("history_entity_ids", 1), ("page_row_ids", 1), ("page_entity_ids", 2))
QUARANTINE_SCHEMA = pa.schema([
    pa.field("part", pa.string()),  # the log file the row came from
    pa.field("row", pa.int64()),  # its row number within that file (0-based)
    pa.field("impression_id", pa.int64()),  # null when that is what was wrong
    pa.field("field", pa.string()),
    pa.field("reason", pa.string()),  # a fixed label per check: what summary.json counts
    pa.field("detail", pa.string()),  # the full message, with the offending value
    pa.field("record", pa.string()),  # the row as JSON, as it was read
])


@dataclass
class Quarantine:
    """Rows set aside by the checks, in read order (one entry per row)."""

    part: list[str] = _field(default_factory=list)
    row: list[int] = _field(default_factory=list)
    impression_id: list[int | None] = _field(default_factory=list)
    field: list[str] = _field(default_factory=list)
    reason: list[str] = _field(default_factory=list)
    detail: list[str] = _field(default_factory=list)
    record: list[str] = _field(default_factory=list)

    def __len__(self) -> int:
        return len(self.row)

    def by_reason(self) -> dict[str, int]:
        """'field: reason' -> rows, most frequent first."""
        return dict(Counter(f"{f}: {r}" for f, r in zip(self.field, self.reason)).most_common())

    def write(self, path: str | Path) -> Path:
        """The set-aside rows as Parquet (QUARANTINE_SCHEMA), written to a temporary name and renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pydict({f.name: getattr(self, f.name) for f in QUARANTINE_SCHEMA}, schema=QUARANTINE_SCHEMA)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)
        return path


def _json_record(row: dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # nan, inf: JSON has no literal for them
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps({k: clean(v) for k, v in row.items()}, default=str)


class RowChecker:
    """The rows of one log part still in play. `refuse` either raises (error mode) or moves rows into the
    quarantine and drops them from `table`, keeping `index` (each remaining row's number in the part: the table
    may be a batch of the part's rows, starting at row first_row)."""

    def __init__(self, table: pa.Table, path: Path, on_bad_rows: OnBadRows, quarantine: Quarantine, first_row: int = 0):
        if on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be one of {list(ON_BAD_ROWS)}, got {on_bad_rows!r}")
        self.table, self.path, self.mode, self.quarantine = table, path, on_bad_rows, quarantine
        self.index = first_row + np.arange(table.num_rows)

    def refuse(self, rows: np.ndarray, name: str, reason: str, detail: Callable[[int], str]) -> None:
        """rows: [n] bool mask or row numbers of the current table; detail(r) the message for current row r."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return
        if self.mode == "error":
            r = int(rows[0])
            raise LogSchemaError(f"{self.path}: row {int(self.index[r])}, field '{name}': {detail(r)}")
        q = self.quarantine
        for r, record in zip(rows.tolist(), self.table.take(pa.array(rows)).to_pylist()):
            q.part.append(str(self.path))
            q.row.append(int(self.index[r]))
            q.impression_id.append(record.get("impression_id"))
            q.field.append(name)
            q.reason.append(reason)
            q.detail.append(detail(r))
            q.record.append(_json_record(record))
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[rows] = False
        self.table = self.table.filter(pa.array(keep))
        self.index = self.index[keep]


# -- reading nested columns ---------------------------------------------------------------------------------
def leaves(col, depth: int):
    """The flat values of a list column nested `depth` deep."""
    for _ in range(depth):
        col = pc.list_flatten(col)
    return col


def row_of_leaf(table: pa.Table, name: str, depth: int, flat_index):
    """Row number(s) of the flat_index-th leaf value(s) of a (nested) list column (int or int array)."""
    arr = table.column(name).combine_chunks()
    idx = flat_index
    levels = []
    for _ in range(depth):
        levels.append(arr)
        arr = arr.flatten()
    for level in reversed(levels):
        offsets = level.offsets.to_numpy() - level.offsets[0].as_py()
        idx = np.searchsorted(offsets, idx, side="right") - 1
    return int(idx) if np.ndim(idx) == 0 else idx


def list_lengths(col) -> np.ndarray:
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def numpy(col) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False) if isinstance(col, (pa.Array, pa.ChunkedArray)) else np.asarray(col)


def per_row(check: RowChecker, name: str, depth: int, bad_leaf: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """[n] bool: rows holding a bad leaf, and each such row's first bad leaf (flat index). depth 0: the leaves
    are the rows."""
    if depth == 0:
        return bad_leaf, {r: r for r in np.flatnonzero(bad_leaf).tolist()}
    flat = np.flatnonzero(bad_leaf)
    rows = np.zeros(check.table.num_rows, dtype=bool)
    first: dict[int, int] = {}
    if len(flat):
        owners = np.atleast_1d(row_of_leaf(check.table, name, depth, flat))
        rows[owners] = True
        for r, k in zip(owners.tolist(), flat.tolist()):
            first.setdefault(r, k)
    return rows, first


# -- the checks -----------------------------------------------------------------------------------------------
def check_enum(check: RowChecker, name: str, allowed: tuple[str, ...], depth: int, key: str = "") -> None:
    values = leaves(check.table.column(name), depth)
    bad = numpy(pc.fill_null(pc.invert(pc.is_in(values, value_set=pa.array(allowed, pa.string()))), False))
    rows, first = per_row(check, name, depth, bad)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    fix = (f"Map it to one of them, or add it to '{key}' in dataset.yaml (docs/dataset.md)." if key else
           "Map it to one of the allowed values (see docs/log_schema.md).")
    check.refuse(rows, name, "unknown value",
                 lambda r: f"value {values[first[r]].as_py()!r} is not one of {list(allowed)[:30]}. {fix}")


def check_nulls(check: RowChecker, schema: pa.Schema) -> None:
    """No null in a required field, nor inside any list (a list's values are parallel to others')."""
    for f in schema:
        if f.name not in check.table.column_names:
            continue
        col = check.table.column(f.name)
        if not f.nullable or f.name == "split":  # a present split column needs a split on every row
            check.refuse(numpy(pc.is_null(col)), f.name, "null", lambda r: "missing value (null); every row needs one")
            col = check.table.column(f.name)
        depth, typ = 0, f.type
        while pa.types.is_list(typ):
            depth, typ = depth + 1, typ.value_type
            inner = leaves(col, depth)
            if inner.null_count:
                rows, _ = per_row(check, f.name, depth, numpy(pc.is_null(inner)))
                check.refuse(rows, f.name, "null in list", lambda r: "a null inside the list; give a value for "
                             "every element")
                col = check.table.column(f.name)


def check_ids(check: RowChecker) -> None:
    """Ids become tokens: no empty id and no whitespace (an id with a space would split into two)."""
    for name, depth in ID_FIELDS:
        values = leaves(check.table.column(name), depth)
        bad = numpy(pc.or_(pc.equal(pc.utf8_length(values), 0), pc.match_substring_regex(values, r"\s")))
        rows, first = per_row(check, name, depth, bad)
        flat = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        check.refuse(rows, name, "empty or whitespace id", lambda r: (
            f"id {flat[first[r]].as_py()!r} is empty or holds whitespace; ids are tokens, rename it "
            "(for example with '_' for spaces) in the logs and the catalog alike"))


def check_range(check: RowChecker, name: str, lo: float, hi: float | None, depth: int = 0,
                what: str = "") -> None:
    """Every (leaf) value finite and in [lo, hi] (hi None: no upper bound)."""
    values = leaves(check.table.column(name), depth)
    v = numpy(values).astype(np.float64)
    bad = ~np.isfinite(v) | (v < lo) | (v > hi if hi is not None else False)
    rows, first = per_row(check, name, depth, bad)
    bound = "" if lo == -math.inf and hi == math.inf else f" in [{lo:g}, {hi:g}]" if hi is not None else f" >= {lo:g}"
    check.refuse(rows, name, "not finite" if not bound else "out of range", lambda r: (
        f"{v[first[r]]:g} is not a finite number{bound}" + (f" ({what})" if what else "")))


def check_history(check: RowChecker) -> None:
    for name in HISTORY_FIELDS[1:]:
        h_len = list_lengths(check.table.column("history_entity_ids"))
        have = list_lengths(check.table.column(name))
        check.refuse(have != h_len, name, "history lists not parallel", lambda r: (
            f"{int(have[r])} values but history_entity_ids has {int(h_len[r])}; history lists must be parallel"))
    check_range(check, "history_days_ago", 0.0, None, 1, "days between the action and the request")
    check_range(check, "history_watch_fraction", 0.0, 1.0, 1, "the share of the title watched")


def check_page_shape(check: RowChecker) -> None:
    """At least one row, no empty row, and every slot field shaped like page_entity_ids."""
    n_rows = list_lengths(check.table.column("page_row_ids"))
    check.refuse(n_rows == 0, "page_row_ids", "empty page", lambda r: "a page needs at least one row")
    n_rows = list_lengths(check.table.column("page_row_ids"))
    ent_rows = list_lengths(check.table.column("page_entity_ids"))
    check.refuse(ent_rows != n_rows, "page_entity_ids", "rows mismatch", lambda r: (
        f"{int(ent_rows[r])} rows of entities but page_row_ids names {int(n_rows[r])} rows"))
    empty = list_lengths(pc.list_flatten(check.table.column("page_entity_ids"))) == 0
    rows, _ = per_row(check, "page_entity_ids", 1, empty)
    check.refuse(rows, "page_entity_ids", "empty row", lambda r: "a row of the page has no entities")
    for name in SLOT_FIELDS:
        if name not in check.table.column_names:
            continue
        col = check.table.column(name)
        bad = list_lengths(col) != list_lengths(check.table.column("page_row_ids"))
        ok = np.flatnonzero(~bad)  # same rows per page: the per-row lengths line up one to one
        same, ents = (col, check.table.column("page_entity_ids")) if not bad.any() else (
            col.take(pa.array(ok)), check.table.column("page_entity_ids").take(pa.array(ok)))
        inner = list_lengths(pc.list_flatten(same))
        if len(inner):
            owner = np.repeat(ok, list_lengths(same))
            bad[np.unique(owner[inner != list_lengths(pc.list_flatten(ents))])] = True
        check.refuse(bad, name, "shape differs from page_entity_ids", lambda r: (
            "its [row][column] shape differs from page_entity_ids; give one value per shown entity"))


def check_duplicates_on_page(check: RowChecker) -> None:
    """A served page shows a title once and a row once (the dedup business rule): a logged page that repeats
    one is a logging fault, and a model trained on it would learn pages the rules forbid."""
    for name, depth, what in (("page_row_ids", 1, "row"), ("page_entity_ids", 2, "title")):
        col = check.table.column(name).combine_chunks()
        values = leaves(col, depth)
        if not len(values):
            continue
        owner = np.arange(len(col))  # the page of each leaf, level by level
        level = col
        for _ in range(depth):
            owner = np.repeat(owner, list_lengths(level))
            level = level.flatten()
        codes = numpy(pc.dictionary_encode(values).indices).astype(np.int64)
        key = owner.astype(np.int64) * (int(codes.max()) + 1) + codes
        order = np.argsort(key, kind="stable")
        repeated = np.zeros(len(key), dtype=bool)  # each second (third...) copy of a value on its page
        repeated[order[1:][key[order][1:] == key[order][:-1]]] = True
        rows, first = per_row(check, name, depth, repeated)
        check.refuse(rows, name, f"{what} twice on the page", lambda r: (
            f"{what} {values[first[r]].as_py()!r} appears twice on the page; a page shows each {what} once"))


def check_rewards(check: RowChecker, rewards=None) -> None:
    """Entity rewards finite, page reward finite and their sum, and (with the dataset's reward system) each
    entity reward the one its feedback earns."""
    check_range(check, "play_minutes", 0.0, None, 2, "minutes played")
    check_range(check, "entity_rewards", -math.inf, math.inf, 2)
    check_range(check, "page_reward", -math.inf, math.inf)
    t = check.table
    flat_rewards = numpy(leaves(t.column("entity_rewards"), 2)).astype(np.float64)
    slots = list_lengths(pc.list_flatten(t.column("entity_rewards")))  # titles per row
    rows_per_page = list_lengths(t.column("entity_rewards"))
    page_of_row = np.repeat(np.arange(t.num_rows), rows_per_page)
    page_of_slot = np.repeat(page_of_row, slots)
    sums = np.bincount(page_of_slot, weights=flat_rewards, minlength=t.num_rows)
    page_reward = numpy(t.column("page_reward")).astype(np.float64)
    bad = np.abs(sums - page_reward) > PAGE_REWARD_TOLERANCE * np.maximum(1.0, np.abs(page_reward))
    check.refuse(bad, "page_reward", "not the sum of entity rewards", lambda r: (
        f"{page_reward[r]:.4f} but entity_rewards sum to {sums[r]:.4f}; page reward must be the sum of entity "
        "rewards (paper section 3)"))
    if rewards is None:
        return
    t = check.table
    flat_rewards = numpy(leaves(t.column("entity_rewards"), 2)).astype(np.float64)
    codes = numpy(pc.index_in(leaves(t.column("feedback"), 2), value_set=pa.array(rewards.feedback_types)))
    thumbs = numpy(leaves(t.column("thumbs_up"), 2)).astype(np.float64)
    expect = rewards.values()[codes.astype(np.int64)] + rewards.thumbs_up * thumbs
    rows, first = per_row(check, "entity_rewards", 2, np.abs(expect - flat_rewards) > ENTITY_REWARD_TOLERANCE)
    check.refuse(rows, "entity_rewards", "not the reward system's", lambda r: (
        f"does not follow the reward system for its feedback (expected {expect[first[r]]}, found "
        f"{flat_rewards[first[r]]}); the reward table in dataset.yaml ('rewards') must be the one the logs were "
        "scored with"))


def check_rows_viewed(check: RowChecker) -> None:
    """Browse depth, where given: between 0 and the rows on the page."""
    if "rows_viewed" not in check.table.column_names:
        return
    seen = check.table.column("rows_viewed")
    v = numpy(pc.fill_null(seen, 0)).astype(np.int64)
    n_rows = list_lengths(check.table.column("page_row_ids"))
    check.refuse((v < 0) | (v > n_rows), "rows_viewed", "out of range", lambda r: (
        f"{int(v[r])} but the page has {int(n_rows[r])} rows; rows_viewed is in [0, rows on the page]"))


class SeenIds:
    """The impression ids kept so far and where each was first read: sorted int64 ids with the part and row of
    each, 20 bytes an id (a dict of Python ints and tuples costs about 150), merged in once per batch."""

    def __init__(self):
        self.ids = np.zeros(0, np.int64)  # [K] sorted
        self.part = np.zeros(0, np.int32)  # [K] index into paths
        self.row = np.zeros(0, np.int64)  # [K] row within that part
        self.paths: list[str] = []

    def find(self, ids: np.ndarray) -> np.ndarray:
        """[n] int64 ids -> [n] their index here, -1 for ids not seen."""
        if not len(self.ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)

    def where(self, k: int) -> tuple[str, int]:
        return self.paths[int(self.part[k])], int(self.row[k])

    def add(self, ids: np.ndarray, path: str, rows: np.ndarray) -> None:
        """ids: [n] new, distinct, none seen; rows: [n] their rows in part `path`."""
        if not self.paths or self.paths[-1] != path:
            self.paths.append(path)
        ids = np.concatenate([self.ids, ids])
        order = np.argsort(ids, kind="stable")  # two sorted runs: a radix / merge pass, not a full sort
        self.ids = ids[order]
        self.part = np.concatenate([self.part, np.full(len(rows), len(self.paths) - 1, np.int32)])[order]
        self.row = np.concatenate([self.row, np.asarray(rows, np.int64)])[order]


def check_unique_ids(check: RowChecker, seen: SeenIds) -> None:
    """impression_id unique across every part read so far (`seen`, updated with this table's kept rows). A
    repeated impression would count its feedback twice; the first occurrence is kept."""
    ids = numpy(check.table.column("impression_id")).astype(np.int64)
    before = seen.find(ids)  # [n] where an id was read in an earlier table, -1 if not
    unique, first = np.unique(ids, return_index=True)
    is_first = np.zeros(len(ids), dtype=bool)
    is_first[first] = True
    bad = (before >= 0) | ~is_first
    path = str(check.path)

    def first_read(r: int) -> tuple[str, int]:
        if before[r] >= 0:
            return seen.where(before[r])
        return path, int(check.index[first[np.searchsorted(unique, ids[r])]])

    kept_ids, kept_rows = ids[~bad], check.index[~bad]
    check.refuse(bad, "impression_id", "duplicate impression id", lambda r: (
        f"impression {int(ids[r])} was already read at {first_read(r)[0]} row {first_read(r)[1]}; "
        "impression ids must be unique across all log parts"))
    seen.add(kept_ids, path, kept_rows)


# -- one part ---------------------------------------------------------------------------------------------------
def check_columns(table: pa.Table, path: Path) -> pa.Table:
    """File-level: every required field present, each castable to its type, no unknown field. Returns the table
    with the schema's types."""
    names = set(table.column_names)
    for f in LOG_SCHEMA:
        if f.name not in names:
            if f.name not in OPTIONAL_FIELDS:
                raise LogSchemaError(f"{path}: missing required field '{f.name}' (type {f.type}). Every impression "
                                     "needs it; see docs/log_schema.md.")
            continue
        have = table.schema.field(f.name).type
        if not have.equals(f.type):
            try:
                table = table.set_column(table.column_names.index(f.name), f.name, table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise LogSchemaError(f"{path}: field '{f.name}' has type {have}, expected {f.type}; convert the "
                                     "column before writing") from None
    extra = sorted(names - set(LOG_SCHEMA.names))
    if extra:
        raise LogSchemaError(f"{path}: unknown field(s) {extra}; remove them or check the spelling (docs/log_schema.md)")
    return table


def validate_table(table: pa.Table, path: str | Path = "<table>", schema=None, on_bad_rows: OnBadRows = "error",
                   quarantine: Quarantine | None = None, seen_ids: SeenIds | None = None,
                   first_row: int = 0) -> pa.Table:
    """Checks a log table row by row against LOG_SCHEMA and, when given, the dataset's schema
    (`homepage.dataset.DatasetSchema`: closed context vocabularies, action and feedback types, row ids, the
    reward system). Returns the rows that pass: all of them, or (error mode) raises LogSchemaError at the first
    refused row; in quarantine mode the refused ones go to `quarantine`. seen_ids: impression ids of the parts
    read before (updated), for uniqueness across parts. first_row: the number in the part of the table's first row,
    when the table is one batch of a part (errors and quarantined rows name rows of the part)."""
    path = Path(path)
    check = RowChecker(check_columns(table, path), path, on_bad_rows,
                       quarantine if quarantine is not None else Quarantine(), first_row)
    check_nulls(check, LOG_SCHEMA)
    for name, lo, hi in (("hour", 0, 23), ("day_of_week", 0, 6)):
        v = numpy(check.table.column(name)).astype(np.int64)
        check.refuse((v < lo) | (v > hi), name, "out of range", lambda r: f"{int(v[r])} is outside {lo}..{hi}")
    if "split" in check.table.column_names:
        check_enum(check, "split", SPLITS, 0)
    if schema is not None:
        for name, vocab in schema.context.items():
            if vocab.closed:
                check_enum(check, name, vocab.values, 0, "context." + name)
        if schema.actions.closed:
            check_enum(check, "history_actions", schema.actions.values, 1, "history.actions")
        check_enum(check, "feedback", schema.rewards.feedback_types, 2, "rewards.feedback")
        check_enum(check, "page_row_ids", schema.row_ids, 1, "rows")
    check_ids(check)
    check_history(check)
    check_page_shape(check)
    check_duplicates_on_page(check)
    check_rewards(check, schema.rewards if schema is not None else None)
    check_rows_viewed(check)
    check_unique_ids(check, seen_ids if seen_ids is not None else SeenIds())  # last: `seen` holds only rows kept
    return check.table


def count_unknown_entities(table: pa.Table, known_entity_ids: set[str] | frozenset[str] | pa.Array) -> tuple[int, int]:
    """(unknown entity ids, impressions holding one) over page and history entity ids. known_entity_ids: a set,
    or a string array of them (built once when batches are counted one by one)."""
    known = (known_entity_ids if isinstance(known_entity_ids, pa.Array)
             else pa.array(sorted(known_entity_ids), pa.string()))
    total, rows = 0, np.zeros(table.num_rows, dtype=bool)
    for depth, name in ((2, "page_entity_ids"), (1, "history_entity_ids")):
        unknown = numpy(pc.invert(pc.is_in(leaves(table.column(name), depth), value_set=known)))
        total += int(unknown.sum())
        if unknown.any():
            rows[row_of_leaf(table, name, depth, np.flatnonzero(unknown))] = True
    return total, int(rows.sum())
