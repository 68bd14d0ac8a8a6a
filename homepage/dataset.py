"""The dataset directory: everything the pipeline knows about a deployment (docs/dataset.md).

    <data_dir>/
      dataset.yaml          context schema, history, restricted profiles, reward system, row taxonomy, page shape
      catalog.parquet       entity_id, entity_type, optional content_embedding, free attribute columns
      logs/part-*.parquet   impression logs (docs/log_schema.md), validated against dataset.yaml

`load_dataset(dir)` reads and validates the schema and the catalog; every error names the file, the row or
field, and the fix (`DatasetError`). The simulator (`recipes/make_world.py`) writes such a directory like any
producer; nothing here knows about it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

DATASET_VERSION = 1
SCHEMA_FILE = "dataset.yaml"
CATALOG_FILE = "catalog.parquet"
LOGS_DIR = "logs"
QUARANTINE_FILE = "quarantine.parquet"  # bad log rows a stage set aside, in its output directory
ROW_KINDS = ("attribute", "boolean", "recency", "history", "list", "all")
CATEGORICAL_CONTEXT = ("language", "profile_type", "device")  # string columns of the logs
NUMERIC_CONTEXT = ("hour", "day_of_week")  # integer columns of the logs, bucketized
_WS = re.compile(r"\s")


class DatasetError(ValueError):
    """A dataset directory does not follow its contract; the message names the file, row or field and the fix."""


@dataclass(frozen=True)
class Vocabulary:
    """A categorical field's values: a closed list, or learned from the logs (values None) keeping those seen at
    least min_count times; values outside it are refused (closed) or encoded as `<unk>` (learned)."""

    values: tuple[str, ...] | None = None  # closed vocabulary; None = learned from the train-split logs
    min_count: int = 1  # learned vocabularies: fewest occurrences for a value to get its own token

    @property
    def closed(self) -> bool:
        return self.values is not None


@dataclass(frozen=True)
class RowDef:
    """One row of the taxonomy (or a template expanding into one row per value) and its eligibility.

    kind: attribute (`column` contains / equals `value`), boolean (`column` is true), recency (`column`, a date,
    within `days` of the dataset's `as_of`), history (titles partly watched in the prompt's history, e.g.
    Continue Watching), list (the explicit `entities`), all (every title)."""

    id: str
    kind: str
    column: str | None = None
    value: Any = None
    days: int | None = None
    entities: tuple[str, ...] = ()


@dataclass(frozen=True)
class PageSpec:
    """Structure bounds of a page."""

    min_rows: int = 3
    max_rows: int = 6
    min_row_len: int = 3
    max_row_len: int = 8


@dataclass(frozen=True)
class RewardSystem:
    """Entity reward = feedback[type] (+ thumbs_up when given); page reward = the sum (paper section 3)."""

    feedback: dict[str, float]  # feedback type -> reward, in log order (codes are indices into this order)
    thumbs_up: float = 0.0

    @property
    def feedback_types(self) -> tuple[str, ...]:
        return tuple(self.feedback)

    def values(self) -> np.ndarray:
        """[F] reward of each feedback type, in `feedback_types` order."""
        return np.array(list(self.feedback.values()), dtype=np.float64)


@dataclass(frozen=True)
class DatasetSchema:
    """dataset.yaml, validated. See docs/dataset.md for every field."""

    name: str
    entity_types: tuple[str, ...]
    context: dict[str, Vocabulary]  # language, profile_type, device
    numeric_edges: dict[str, tuple[float, ...]]  # hour, day_of_week -> bucket edges (b buckets = edges + 1)
    actions: Vocabulary
    days_ago_edges: tuple[float, ...]
    watch_fraction_edges: tuple[float, ...]
    partial_watch: tuple[float, float]  # history rows: titles watched within [lo, hi) of their length
    max_history: int
    restricted_profiles: dict[str, str]  # profile_type value -> boolean catalog column of titles allowed
    rewards: RewardSystem
    rows: tuple[RowDef, ...]  # templates expanded
    page: PageSpec
    pinned_rows: dict[str, int]
    critical_rows: dict[str, int]
    as_of: dt.date | None = None
    embedding_dim: int | None = None
    environment: str | None = None  # dotted path of the dataset's own ground truth, if it has one

    @property
    def row_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rows)


@dataclass
class Dataset:
    """A loaded dataset directory: the schema, the catalog table and where the logs are."""

    root: Path
    schema: DatasetSchema
    catalog: pa.Table

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def entity_ids(self) -> list[str]:
        return self.catalog.column("entity_id").to_pylist()

    @property
    def entity_types(self) -> list[str]:
        return self.catalog.column("entity_type").to_pylist()

    def content(self) -> dict[str, np.ndarray]:
        """entity id -> content embedding (empty when the catalog has none)."""
        if "content_embedding" not in self.catalog.column_names:
            return {}
        return {e: np.asarray(v, dtype=np.float32) for e, v in
                zip(self.entity_ids, self.catalog.column("content_embedding").to_pylist())}

    def content_matrix(self) -> np.ndarray:
        """[N, D] content embeddings in catalog order (D = 0 without them)."""
        if "content_embedding" not in self.catalog.column_names:
            return np.zeros((self.catalog.num_rows, 0), np.float32)
        col = self.catalog.column("content_embedding").combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(self.catalog.num_rows, -1)

    def row_eligibility(self) -> dict[str, np.ndarray]:
        """Row id -> [N] bool titles the row may hold, for every row except history rows (per prompt)."""
        return {r.id: row_mask(r, self.catalog, self.schema.as_of) for r in self.schema.rows if r.kind != "history"}

    def allowed_for_profile(self) -> dict[str, np.ndarray]:
        """Restricted profile value -> [N] bool titles allowed for it."""
        return {p: _bool_column(self.catalog, c) for p, c in self.schema.restricted_profiles.items()}


# ----------------------------------------------------------------------------------------------------------
# Parsing dataset.yaml
# ----------------------------------------------------------------------------------------------------------
def _need(data: dict, key: str, where: str, what: str) -> Any:
    if key not in data:
        raise DatasetError(f"{where}: missing '{key}' ({what}); see docs/dataset.md")
    return data[key]


def _vocab(spec: Any, where: str) -> Vocabulary:
    if isinstance(spec, list):
        spec = {"values": spec}
    if not isinstance(spec, dict) or not set(spec) <= {"values", "min_count"}:
        raise DatasetError(f"{where}: expected {{values: [...]}} (closed) or {{min_count: k}} (learned from the logs)")
    values = spec.get("values")
    if values is not None:
        values = tuple(str(v) for v in values)
        bad = [v for v in values if not v or _WS.search(v)]
        if bad or len(set(values)) != len(values):
            raise DatasetError(f"{where}.values: values must be unique non-empty strings without whitespace, got {list(values)}")
    min_count = spec.get("min_count", 1)
    if not isinstance(min_count, int) or min_count < 1:
        raise DatasetError(f"{where}.min_count: must be an integer >= 1, got {min_count!r}")
    return Vocabulary(values, min_count)


def _edges(spec: Any, where: str) -> tuple[float, ...]:
    if not isinstance(spec, list) or not all(isinstance(x, (int, float)) for x in spec) or sorted(spec) != spec \
            or len(set(spec)) != len(spec):
        raise DatasetError(f"{where}: bucket edges must be a strictly increasing list of numbers, got {spec!r}")
    return tuple(float(x) for x in spec)


def _rows(specs: Any, catalog: pa.Table, path: Path, as_of) -> tuple[RowDef, ...]:
    if not isinstance(specs, list) or not specs:
        raise DatasetError(f"{path}: 'rows' must be a non-empty list of row definitions (docs/dataset.md)")
    columns = catalog.column_names
    out: list[RowDef] = []
    for i, spec in enumerate(specs):
        where = f"{path}: rows[{i}]"
        if not isinstance(spec, dict):
            raise DatasetError(f"{where}: expected a mapping with 'id' (or 'template') and 'kind'")
        unknown = set(spec) - {"id", "template", "kind", "column", "value", "values", "days", "entities"}
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}")
        kind = spec.get("kind")
        if kind not in ROW_KINDS:
            raise DatasetError(f"{where}: kind {kind!r} is not one of {list(ROW_KINDS)}")
        column = spec.get("column")
        if kind in ("attribute", "boolean", "recency"):
            if column is None:
                raise DatasetError(f"{where}: a {kind} row needs 'column' (a catalog column)")
            if column not in columns:
                raise DatasetError(f"{where}: column {column!r} is not a column of {path.parent / CATALOG_FILE} "
                                   f"(columns: {columns}); fix the name or add the column to the catalog")
        if kind == "recency":
            if not isinstance(spec.get("days"), int) or spec["days"] < 1:
                raise DatasetError(f"{where}: a recency row needs 'days', an integer >= 1")
            if as_of is None:
                raise DatasetError(f"{path}: recency rows need the dataset's 'as_of' date (the day the logs end)")
            if not pa.types.is_temporal(catalog.schema.field(column).type):
                raise DatasetError(f"{where}: column {column!r} must hold dates (it has {catalog.schema.field(column).type})")
        if kind == "boolean" and not pa.types.is_boolean(catalog.schema.field(column).type):
            raise DatasetError(f"{where}: column {column!r} must be boolean (it has {catalog.schema.field(column).type})")
        if "template" in spec:
            if kind != "attribute" or "{value}" not in str(spec["template"]):
                raise DatasetError(f"{where}: a template is an attribute row whose id contains '{{value}}', e.g. genre_{{value}}")
            values = spec.get("values")
            if values is None:
                flat = catalog.column(column)
                if pa.types.is_list(flat.type):
                    flat = pc.list_flatten(flat)
                values = sorted({str(v) for v in flat.to_pylist() if v is not None})
            out += [RowDef(str(spec["template"]).format(value=v), "attribute", column, v) for v in values]
            continue
        row_id = spec.get("id")
        if not isinstance(row_id, str) or not row_id or _WS.search(row_id):
            raise DatasetError(f"{where}: 'id' must be a non-empty string without whitespace, got {row_id!r}")
        if kind == "attribute" and "value" not in spec:
            raise DatasetError(f"{where}: an attribute row needs 'value' (the category the column must contain)")
        out.append(RowDef(row_id, kind, column, spec.get("value"), spec.get("days"), tuple(spec.get("entities") or ())))
    ids = [r.id for r in out]
    dup = sorted({r for r in ids if ids.count(r) > 1})
    if dup:
        raise DatasetError(f"{path}: row id(s) {dup} defined twice; every row id must be unique")
    return tuple(out)


def parse_schema(data: dict, catalog: pa.Table, path: Path) -> DatasetSchema:
    """dataset.yaml contents -> DatasetSchema, checked against the catalog (path names the file in errors)."""
    where = str(path)
    if data.get("version") != DATASET_VERSION:
        raise DatasetError(f"{where}: 'version' is {data.get('version')!r}; this toolkit reads dataset version "
                           f"{DATASET_VERSION} (docs/dataset.md)")
    known = {"version", "name", "as_of", "entity_types", "embedding_dim", "context", "history", "max_history",
             "restricted_profiles", "rewards", "rows", "page", "pinned_rows", "critical_rows", "environment"}
    unknown = set(data) - known
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    context_spec = _need(data, "context", where, "the context fields")
    context, edges = {}, {}
    for name in CATEGORICAL_CONTEXT:
        context[name] = _vocab(_need(context_spec, name, f"{where}: context", "a categorical field"), f"{where}: context.{name}")
    for name in NUMERIC_CONTEXT:
        spec = _need(context_spec, name, f"{where}: context", "a numeric field with bucket edges")
        edges[name] = _edges(spec.get("edges") if isinstance(spec, dict) else None, f"{where}: context.{name}.edges")
    unknown = set(context_spec) - set(CATEGORICAL_CONTEXT) - set(NUMERIC_CONTEXT)
    if unknown:
        raise DatasetError(f"{where}: context: unknown field(s) {sorted(unknown)}; the log schema has "
                           f"{list(CATEGORICAL_CONTEXT + NUMERIC_CONTEXT)}")
    hist = _need(data, "history", where, "history action types and buckets")
    partial = hist.get("partial_watch", [0.05, 0.9])
    if not (isinstance(partial, list) and len(partial) == 2 and 0 <= partial[0] < partial[1] <= 1):
        raise DatasetError(f"{where}: history.partial_watch must be [lo, hi] with 0 <= lo < hi <= 1, got {partial!r}")
    wf_edges = _edges(_need(hist, "watch_fraction_edges", f"{where}: history", "bucket edges of the share watched"),
                      f"{where}: history.watch_fraction_edges")
    missing = [x for x in partial if x not in (0.0, 1.0) and x not in wf_edges]
    if missing:
        raise DatasetError(f"{where}: history.partial_watch bounds {missing} must be watch_fraction_edges (the prompt "
                           "only knows buckets)")

    entity_types = tuple(str(t) for t in _need(data, "entity_types", where, "the catalog's entity types"))
    as_of = data.get("as_of")
    if as_of is not None and not isinstance(as_of, dt.date):
        try:
            as_of = dt.date.fromisoformat(str(as_of))
        except ValueError:
            raise DatasetError(f"{where}: as_of must be a date (YYYY-MM-DD), got {as_of!r}") from None
    rewards = _need(data, "rewards", where, "the reward system: feedback types and their rewards")
    fb = _need(rewards, "feedback", f"{where}: rewards", "feedback type -> reward")
    if not isinstance(fb, dict) or not fb:
        raise DatasetError(f"{where}: rewards.feedback must map each feedback type to its reward")
    reward_system = RewardSystem({str(k): float(v) for k, v in fb.items()}, float(rewards.get("thumbs_up", 0.0)))
    restricted = {str(k): str(v) for k, v in (data.get("restricted_profiles") or {}).items()}
    profile_vocab = context["profile_type"]
    for value, column in restricted.items():
        if profile_vocab.closed and value not in profile_vocab.values:
            raise DatasetError(f"{where}: restricted_profiles: {value!r} is not a context.profile_type value "
                               f"{list(profile_vocab.values)}")
        if column not in catalog.column_names or not pa.types.is_boolean(catalog.schema.field(column).type):
            raise DatasetError(f"{where}: restricted_profiles.{value}: {column!r} must be a boolean column of the "
                               f"catalog (columns: {catalog.column_names})")
    rows = _rows(_need(data, "rows", where, "the row taxonomy"), catalog, path, as_of)
    page = PageSpec(**(data.get("page") or {}))
    if not (1 <= page.min_rows <= page.max_rows and 1 <= page.min_row_len <= page.max_row_len):
        raise DatasetError(f"{where}: page: need 1 <= min_rows <= max_rows and 1 <= min_row_len <= max_row_len, got {page}")
    row_ids = {r.id for r in rows}
    for key in ("pinned_rows", "critical_rows"):
        unknown = set(data.get(key) or {}) - row_ids
        if unknown:
            raise DatasetError(f"{where}: {key}: row(s) {sorted(unknown)} are not defined in 'rows'")
    return DatasetSchema(
        name=str(data.get("name", path.parent.name)), entity_types=entity_types, context=context, numeric_edges=edges,
        actions=_vocab(_need(hist, "actions", f"{where}: history", "history action types"), f"{where}: history.actions"),
        days_ago_edges=_edges(_need(hist, "days_ago_edges", f"{where}: history", "bucket edges of days since an action"),
                              f"{where}: history.days_ago_edges"),
        watch_fraction_edges=wf_edges, partial_watch=(float(partial[0]), float(partial[1])),
        max_history=int(data.get("max_history", 24)), restricted_profiles=restricted, rewards=reward_system, rows=rows,
        page=page, pinned_rows=dict(data.get("pinned_rows") or {}), critical_rows=dict(data.get("critical_rows") or {}),
        as_of=as_of, embedding_dim=data.get("embedding_dim"), environment=data.get("environment"),
    )


# ----------------------------------------------------------------------------------------------------------
# The catalog
# ----------------------------------------------------------------------------------------------------------
def validate_catalog(table: pa.Table, path: Path, embedding_dim: int | None) -> None:
    """Raises DatasetError naming the row and field of the first bad value (ids, embeddings)."""
    for name in ("entity_id", "entity_type"):
        if name not in table.column_names:
            raise DatasetError(f"{path}: missing column '{name}' (string); every catalog row needs one")
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{path}: row {row}, field '{name}': missing value (null)")
    ids = table.column("entity_id").to_pylist()
    for row, e in enumerate(ids):
        if not isinstance(e, str) or not e or _WS.search(e):
            raise DatasetError(f"{path}: row {row}, field 'entity_id': {e!r} contains whitespace or is empty; entity ids "
                               "are tokens: replace whitespace (e.g. by '_')")
    seen: dict[str, int] = {}
    for row, e in enumerate(ids):
        if e in seen:
            raise DatasetError(f"{path}: row {row}, field 'entity_id': {e!r} repeats row {seen[e]}; ids must be unique")
        seen[e] = row
    if "content_embedding" in table.column_names:
        col = table.column("content_embedding")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        dim = embedding_dim if embedding_dim is not None else (int(lengths[0]) if len(lengths) else 0)
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            r = int(bad[0])
            raise DatasetError(f"{path}: row {r}, field 'content_embedding': {lengths[r]} values, expected {dim} "
                               "(every title's embedding has the same size; set embedding_dim in dataset.yaml)")
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.isfinite(flat).all():
            r = int(np.flatnonzero(~np.isfinite(flat))[0] // max(dim, 1))
            raise DatasetError(f"{path}: row {r}, field 'content_embedding': a value is not finite")


def check_entity_types(table: pa.Table, path: Path, entity_types: tuple[str, ...]) -> None:
    """Raises DatasetError naming the first catalog row whose entity_type the schema does not declare."""
    for row, t in enumerate(table.column("entity_type").to_pylist()):
        if t not in entity_types:
            raise DatasetError(f"{path}: row {row}, field 'entity_type': {t!r} is not one of the dataset's "
                               f"entity_types {list(entity_types)}; add it to dataset.yaml or fix the row")


def _bool_column(catalog: pa.Table, column: str) -> np.ndarray:
    return np.asarray(catalog.column(column).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def row_mask(row: RowDef, catalog: pa.Table, as_of: dt.date | None) -> np.ndarray:
    """[N] bool: the titles the (non-history) row may hold."""
    n = catalog.num_rows
    if row.kind == "all":
        return np.ones(n, dtype=bool)
    if row.kind == "list":
        wanted = set(row.entities)
        return np.array([e in wanted for e in catalog.column("entity_id").to_pylist()], dtype=bool)
    if row.kind == "boolean":
        return _bool_column(catalog, row.column)
    if row.kind == "recency":
        dates = catalog.column(row.column).cast(pa.date32()).to_numpy(zero_copy_only=False)
        age = (np.datetime64(as_of, "D") - dates.astype("datetime64[D]")).astype(np.int64)  # [N] days
        return (age >= 0) & (age < row.days)
    if row.kind == "attribute":
        col = catalog.column(row.column).combine_chunks()
        if pa.types.is_list(col.type):
            return np.array([row.value in (v or ()) for v in col.to_pylist()], dtype=bool)
        return np.array([v == row.value for v in col.to_pylist()], dtype=bool)
    raise DatasetError(f"row {row.id}: kind {row.kind!r} has no static eligibility")


# ----------------------------------------------------------------------------------------------------------
# Loading and writing
# ----------------------------------------------------------------------------------------------------------
def load_dataset(root: str | Path) -> Dataset:
    """Reads and validates a dataset directory (schema and catalog; the logs are read by homepage.logs)."""
    root = Path(root)
    schema_path, catalog_path = root / SCHEMA_FILE, root / CATALOG_FILE
    for need, how in ((schema_path, "write it (docs/dataset.md)"), (catalog_path, "write the catalog as Parquet")):
        if not need.exists():
            raise DatasetError(f"{need} is missing: {how}, or create the toy dataset with `python recipes/make_world.py`")
    try:
        catalog = pq.read_table(catalog_path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{catalog_path}: not a readable Parquet file ({e})") from None
    try:
        data = yaml.safe_load(schema_path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{schema_path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{schema_path}: expected a mapping at the top level")
    validate_catalog(catalog, catalog_path, data.get("embedding_dim"))  # ids first: rows and the schema refer to them
    schema = parse_schema(data, catalog, schema_path)
    check_entity_types(catalog, catalog_path, schema.entity_types)
    known = set(catalog.column("entity_id").to_pylist())
    for r in schema.rows:
        missing = [e for e in r.entities if e not in known]
        if missing:
            raise DatasetError(f"{schema_path}: row {r.id!r} lists entities not in the catalog, e.g. {missing[:3]}")
    return Dataset(root, schema, catalog)


def schema_to_dict(schema: DatasetSchema) -> dict:
    """The inverse of parse_schema for writers (templates are written expanded)."""

    def vocab(v: Vocabulary) -> dict:
        return {"values": list(v.values)} if v.closed else {"min_count": v.min_count}

    def row(r: RowDef) -> dict:
        out = {"id": r.id, "kind": r.kind}
        if r.column is not None:
            out["column"] = r.column
        if r.value is not None:
            out["value"] = r.value
        if r.days is not None:
            out["days"] = r.days
        if r.entities:
            out["entities"] = list(r.entities)
        return out

    data = {
        "version": DATASET_VERSION, "name": schema.name, "entity_types": list(schema.entity_types),
        "context": {**{k: vocab(v) for k, v in schema.context.items()},
                    **{k: {"edges": list(e)} for k, e in schema.numeric_edges.items()}},
        "history": {"actions": vocab(schema.actions), "days_ago_edges": list(schema.days_ago_edges),
                    "watch_fraction_edges": list(schema.watch_fraction_edges), "partial_watch": list(schema.partial_watch)},
        "max_history": schema.max_history, "restricted_profiles": dict(schema.restricted_profiles),
        "rewards": {"feedback": dict(schema.rewards.feedback), "thumbs_up": schema.rewards.thumbs_up},
        "rows": [row(r) for r in schema.rows], "page": dataclasses.asdict(schema.page),
        "pinned_rows": dict(schema.pinned_rows), "critical_rows": dict(schema.critical_rows),
    }
    if schema.as_of is not None:
        data["as_of"] = schema.as_of.isoformat()
    if schema.embedding_dim is not None:
        data["embedding_dim"] = schema.embedding_dim
    if schema.environment:
        data["environment"] = schema.environment
    return data


def write_dataset(root: str | Path, schema: dict, catalog: pa.Table) -> Dataset:
    """Writes dataset.yaml and catalog.parquet (atomically each), then loads them back through the validator."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, write in ((CATALOG_FILE, lambda p: pq.write_table(catalog, p)),
                        (SCHEMA_FILE, lambda p: p.write_text(yaml.safe_dump(schema, sort_keys=False, width=120)))):
        tmp = root / f".{name}.tmp"
        write(tmp)
        tmp.rename(root / name)
    return load_dataset(root)


def open_dataset(root: str | Path, on_bad_rows: str = "error", max_bad_fraction: float = 0.0,
                 quarantine_path: str | Path | None = None, cache_dir: str | Path | None = None):
    """(Dataset, validated log table, LogReport) of a dataset directory: what every stage starts from. Bad log
    rows stop it (error) or are set aside into quarantine_path (quarantine; homepage/validation.py).
    cache_dir: keep the validated table there as a memory-mapped Arrow file (cached_logs), so memory does not
    hold the log and the next stage on the same dataset skips validation; None: validated into memory."""
    from homepage.logs import read_logs

    dataset = load_dataset(root)
    if not dataset.logs.exists():
        raise DatasetError(f"{dataset.logs} is missing: put the impression logs there as Parquet (docs/log_schema.md)")
    if cache_dir is not None:
        table, report = cached_logs(dataset, cache_dir, on_bad_rows, max_bad_fraction, quarantine_path)
    else:
        table, report = read_logs(dataset.logs, dataset.schema, known_entity_ids=frozenset(dataset.entity_ids),
                                  on_bad_rows=on_bad_rows, max_bad_fraction=max_bad_fraction,
                                  quarantine_path=quarantine_path)
    return dataset, table, report


LOGS_TABLE, LOGS_REPORT = "logs.arrow", "report.json"  # a validated-logs cache entry's files (and QUARANTINE_FILE)


def logs_key(dataset: Dataset, on_bad_rows: str, max_bad_fraction: float) -> str:
    """What the validated table depends on: the validating code, the dataset's schema and catalog, the log files'
    path, names and bytes, and the bad-row policy."""
    import hashlib

    import homepage.logs
    import homepage.validation

    h = hashlib.blake2b(digest_size=16)
    # the logs' own path too: errors and quarantined rows name their files
    h.update(repr((on_bad_rows, float(max_bad_fraction), str(dataset.logs.resolve()))).encode())
    hash_files(h, [Path(homepage.logs.__file__), Path(homepage.validation.__file__), dataset.root / SCHEMA_FILE,
                   dataset.root / CATALOG_FILE, *homepage.logs.log_parts(dataset.logs)])
    return h.hexdigest()


def hash_files(h, paths) -> None:
    """Feeds each file's name and bytes into the hash h (a cache key's sources), 16 MB at a time."""
    for path in paths:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)


def remove_stale_entries(entry: Path) -> int:
    """Removes the temporary directories `.tmp_<entry name>_<pid>` of an entry whose writer is gone (killed
    mid-write): the next writer of the same entry leaves no debris behind. -> how many"""
    import os
    import shutil

    removed = 0
    for tmp in entry.parent.glob(f".tmp_{entry.name}_*"):
        try:
            os.kill(int(tmp.name.rsplit("_", 1)[1]), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed


def cached_logs(dataset: Dataset, cache_dir: str | Path, on_bad_rows: str = "error", max_bad_fraction: float = 0.0,
                quarantine_path: str | Path | None = None):
    """The dataset's validated logs as a memory-mapped Arrow file under cache_dir/<logs_key>, with the report and
    the quarantined rows beside it. The first stage on a dataset validates batch by batch into a temporary entry
    renamed when whole (a kill never leaves half of one); the next ones map it. -> (table, LogReport)"""
    import json
    import os
    import shutil

    from homepage.logs import LogReport, open_table, read_logs
    from homepage.validation import Quarantine

    entry = Path(cache_dir) / logs_key(dataset, on_bad_rows, max_bad_fraction)
    fresh = not (entry / LOGS_REPORT).exists()
    if fresh:
        remove_stale_entries(entry)
        tmp = entry.with_name(f".tmp_{entry.name}_{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:  # the quarantine goes to the stage's file first: when there are too many bad rows, it is there to read
            _, report = read_logs(dataset.logs, dataset.schema, known_entity_ids=frozenset(dataset.entity_ids),
                                  on_bad_rows=on_bad_rows, max_bad_fraction=max_bad_fraction,
                                  quarantine_path=quarantine_path or tmp / QUARANTINE_FILE, out_file=tmp / LOGS_TABLE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if report.quarantine_file and Path(report.quarantine_file) != tmp / QUARANTINE_FILE:
            shutil.copyfile(report.quarantine_file, tmp / QUARANTINE_FILE)
        facts = {k: getattr(report, k) for k in ("rows", "filled", "unknown_entities", "rows_with_unknown", "rows_read")}
        (tmp / LOGS_REPORT).write_text(json.dumps(facts))
        try:
            tmp.rename(entry)
        except OSError:  # another rank or stage wrote the same entry meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    facts = json.loads((entry / LOGS_REPORT).read_text())
    quarantine = Quarantine()
    if (entry / QUARANTINE_FILE).exists():
        rows = pq.read_table(entry / QUARANTINE_FILE).to_pydict()
        quarantine = Quarantine(**rows)
    report = LogReport(str(dataset.logs), quarantine=quarantine, from_cache=not fresh, **facts)
    if len(quarantine) and quarantine_path is not None:
        quarantine_path = Path(quarantine_path)
        if not fresh:  # this stage's copy of the rows set aside (a fresh validation wrote it there itself)
            quarantine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp_q = quarantine_path.with_name(f".{quarantine_path.name}.tmp")
            shutil.copyfile(entry / QUARANTINE_FILE, tmp_q)
            tmp_q.rename(quarantine_path)
        report.quarantine_file = str(quarantine_path)
    return open_table(entry / LOGS_TABLE), report


def open_stage_dataset(cfg, out: str | Path, quarantine: bool = True):
    """open_dataset for a stage config (`common.config.StageConfig`): its data_dir, bad-row policy and validated-logs
    cache, the quarantine file in the stage's output directory (quarantine=False: not written, for the
    data-parallel ranks but rank 0, which read the same rows)."""
    return open_dataset(cfg.data_dir, cfg.on_bad_rows, cfg.max_bad_fraction,
                        Path(out) / QUARANTINE_FILE if quarantine else None, cfg.logs_cache_dir or None)
