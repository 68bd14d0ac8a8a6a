"""Row checks and quarantine (homepage/validation.py): every value a later stage would misread is refused with
its row and field, and in quarantine mode exactly the bad rows are set aside and counted. The property-based
part mutates valid rows and whole files (hypothesis) and asserts that the reader never accepts a mutation
silently and never raises anything but its own LogSchemaError."""

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from homepage.logs import LOG_SCHEMA, LogSchemaError, read_logs
from homepage.validation import QUARANTINE_SCHEMA
from tests.homepage.helpers import LOG_ROWS, set_cell, write_log

N_ROWS = LOG_ROWS
CONTEXT = {}  # the toy dataset's schema, for the reads below


@pytest.fixture
def table(log_table, toy_schema):
    """A valid log table; its dataset's schema goes to CONTEXT."""
    CONTEXT["schema"] = toy_schema
    return log_table


def write(path, table) -> str:
    return str(write_log(path, table))


def refused(path, table, **kw) -> str:
    with pytest.raises(LogSchemaError) as exc:
        read_logs(write(path, table), CONTEXT["schema"], **kw)
    return str(exc.value)


# -- the values the reader used to accept ------------------------------------------------------------------
def first_page_with_rows(table, at_least: int) -> int:
    return next(i for i, rows in enumerate(table.column("page_row_ids").to_pylist()) if len(rows) >= at_least)


@pytest.mark.parametrize("name, edit, expect", [
    ("history_days_ago", lambda v: [math.nan] + v[1:], "not a finite number >= 0"),
    ("history_days_ago", lambda v: [-2.0] + v[1:], "-2 is not a finite number >= 0"),
    ("history_watch_fraction", lambda v: [7.5] + v[1:], r"7.5 is not a finite number in \[0, 1\]"),
    ("play_minutes", lambda v: [[-3.0] + v[0][1:]] + v[1:], "-3 is not a finite number >= 0"),
    ("rows_viewed", lambda v: -1, r"rows_viewed is in \[0, rows on the page\]"),
    ("rows_viewed", lambda v: 7, r"7 but the page has \d rows"),
    ("history_entity_ids", lambda v: ["movie 0001"] + v[1:], "'movie 0001' is empty or holds whitespace"),
    ("page_entity_ids", lambda v: [[v[0][0], v[0][0]] + v[0][2:]] + v[1:], "appears twice on the page"),
    ("page_row_ids", lambda v: [v[0], v[0]] + v[2:], "row '.*' appears twice on the page"),
    ("page_reward", lambda v: math.nan, "is not a finite number"),
    ("split", lambda v: None, "missing value"),
])
def test_values_a_later_stage_would_misread_are_refused_with_row_and_field(tmp_path, table, name, edit, expect):
    row = first_page_with_rows(table, 3)
    msg = refused(tmp_path / "log.parquet", set_cell(table, name, row, edit(table.column(name)[row].as_py())))
    assert re.search(rf"log.parquet: row {row}, field '{name}': .*{expect}", msg), msg


def test_impression_ids_are_unique_across_parts(tmp_path, table):
    (tmp_path / "logs").mkdir()
    write(tmp_path / "logs" / "part-0.parquet", table.slice(0, 20))
    again = set_cell(table.slice(20), "impression_id", 5, table.column("impression_id")[3].as_py())
    write(tmp_path / "logs" / "part-1.parquet", again)
    with pytest.raises(LogSchemaError, match=r"part-1.parquet: row 5, field 'impression_id': impression \d+ was "
                                             r"already read at .*part-0.parquet row 3"):
        read_logs(tmp_path / "logs")
    kept, report = read_logs(tmp_path / "logs", on_bad_rows="quarantine", max_bad_fraction=0.1)
    assert kept.num_rows == N_ROWS - 1 and report.quarantine.row == [5]  # the later copy goes, the first stays


def test_a_part_is_validated_in_batches_that_name_the_parts_rows(tmp_path, table, monkeypatch):
    """A part larger than a batch: each batch is checked on its own (the checks' temporaries grow with the batch,
    not the part), and errors, quarantined rows and repeated ids still name rows of the part."""
    import homepage.logs

    monkeypatch.setattr(homepage.logs, "VALIDATE_BATCH_ROWS", 8)  # 50 rows: 7 batches
    ids = table.column("impression_id")
    bad = set_cell(set_cell(table, "hour", 13, 30), "impression_id", 41, ids[2].as_py())  # rows in batches 1 and 5
    path = write(tmp_path / "log.parquet", bad)
    with pytest.raises(LogSchemaError, match=r"log.parquet: row 13, field 'hour'"):
        read_logs(path, CONTEXT["schema"])
    kept, report = read_logs(path, CONTEXT["schema"], on_bad_rows="quarantine", max_bad_fraction=0.1)
    assert report.quarantine.row == [13, 41] and report.rows_read == N_ROWS and kept.num_rows == N_ROWS - 2
    assert "already read at " + path + " row 2" in report.quarantine.detail[1]
    whole, _ = read_logs(write(tmp_path / "good.parquet", table), CONTEXT["schema"])  # in batches of 8
    monkeypatch.setattr(homepage.logs, "VALIDATE_BATCH_ROWS", 10_000)  # in one batch
    assert read_logs(write(tmp_path / "one.parquet", table), CONTEXT["schema"])[0].to_pylist() == whole.to_pylist()


# -- quarantine ---------------------------------------------------------------------------------------------
def test_quarantine_sets_the_bad_rows_aside_names_them_and_counts_them(tmp_path, table):
    bad = set_cell(table, "hour", 4, 30)
    bad = set_cell(bad, "history_watch_fraction", 9, [7.5] * len(table.column("history_watch_fraction")[9]))
    bad = set_cell(bad, "user_id", 17, None)
    path = write(tmp_path / "log.parquet", bad)
    kept, report = read_logs(path, CONTEXT["schema"], on_bad_rows="quarantine", max_bad_fraction=0.1,
                             quarantine_path=tmp_path / "out" / "quarantine.parquet")
    assert kept.num_rows == N_ROWS - 3 and report.rows == N_ROWS - 3 and report.rows_read == N_ROWS
    kept_ids = set(kept.column("impression_id").to_pylist())
    bad_ids = {table.column("impression_id")[r].as_py() for r in (4, 9, 17)}
    assert kept_ids.isdisjoint(bad_ids) and len(kept_ids | bad_ids) == N_ROWS
    assert report.bad_row_reasons() == {"user_id: null": 1, "hour: out of range": 1,
                                        "history_watch_fraction: out of range": 1}
    q = pq.read_table(report.quarantine_file)
    assert q.schema.equals(QUARANTINE_SCHEMA)
    rows = sorted(zip(q.column("row").to_pylist(), q.column("field").to_pylist(), q.column("part").to_pylist()))
    assert rows == [(4, "hour", path), (9, "history_watch_fraction", path), (17, "user_id", path)]
    assert '"hour": 30' in q.column("record")[q.column("row").to_pylist().index(4)].as_py()
    assert report.bad_rows()["quarantined"] == 3 and "3 bad rows quarantined" in report.summary()


def test_quarantine_stops_with_the_count_above_max_bad_fraction(tmp_path, table):
    bad = set_cell(set_cell(table, "hour", 4, 30), "hour", 5, -1)  # 2 of 50 rows: 4%
    path = write(tmp_path / "log.parquet", bad)
    with pytest.raises(LogSchemaError, match=r"2 of 50 rows \(4.00%\) are bad, more than max_bad_fraction=0.03; "
                                             r"by reason: \{'hour: out of range': 2\}; the rows are in .*q.parquet"):
        read_logs(path, CONTEXT["schema"], on_bad_rows="quarantine", max_bad_fraction=0.03,
                  quarantine_path=tmp_path / "q.parquet")
    assert pq.read_table(tmp_path / "q.parquet").num_rows == 2  # written before stopping, for inspection
    kept, _ = read_logs(path, CONTEXT["schema"], on_bad_rows="quarantine", max_bad_fraction=0.04)
    assert kept.num_rows == 48


def test_error_mode_is_the_default_and_file_faults_stop_either_way(tmp_path, table):
    msg = refused(tmp_path / "a.parquet", set_cell(table, "hour", 4, 30))
    assert "row 4, field 'hour'" in msg
    with pytest.raises(LogSchemaError, match="missing required field 'page_reward'"):
        read_logs(write(tmp_path / "b.parquet", table.drop_columns(["page_reward"])), on_bad_rows="quarantine",
                  max_bad_fraction=1.0)
    with pytest.raises(ValueError, match="on_bad_rows must be one of"):
        read_logs(tmp_path / "a.parquet", on_bad_rows="skip")


# -- property-based mutations ---------------------------------------------------------------------------------
SKIP = object()  # a mutation that does not apply to this row (e.g. "title twice" on a one-title row)


def drop_one(v):
    return v[1:] if v else SKIP


def first_leaf(v, x):
    """v with its first leaf (v[0] or v[0][0]) replaced by x."""
    if v and isinstance(v[0], list):
        return [first_leaf(v[0], x)] + v[1:]
    return [x] + v[1:]


NAN, INF = float("nan"), float("inf")
# field -> [(mutation name, value -> invalid value, fields the error may name)]. Removing one element of a
# parallel list is refused on its partner; a wrong reward may be named as the page's sum.
MUTATIONS = {
    "impression_id": [("null", lambda v: None, ()), ("copy of row 0's", "DUPLICATE", ())],
    "user_id": [("null", lambda v: None, ()), ("empty", lambda v: "", ()), ("whitespace", lambda v: v + " x", ())],
    "split": [("null", lambda v: None, ()), ("unknown", lambda v: "training", ())],
    "language": [("null", lambda v: None, ()), ("unknown", lambda v: "klingon", ())],
    "profile_type": [("null", lambda v: None, ()), ("unknown", lambda v: "teen", ())],
    "hour": [("null", lambda v: None, ()), ("negative", lambda v: -1, ()), ("24", lambda v: 24, ()),
             ("100", lambda v: 100, ())],
    "day_of_week": [("null", lambda v: None, ()), ("7", lambda v: 7, ()), ("negative", lambda v: -3, ())],
    "device": [("null", lambda v: None, ()), ("unknown", lambda v: "smart_fridge", ())],
    "history_entity_ids": [("null", lambda v: None, ()), ("whitespace", lambda v: first_leaf(v, "a b"), ()),
                           ("empty id", lambda v: first_leaf(v, ""), ()), ("null id", lambda v: first_leaf(v, None), ()),
                           ("one fewer", drop_one, ("history_actions",))],
    "history_actions": [("unknown", lambda v: first_leaf(v, "rewatch"), ()), ("null", lambda v: first_leaf(v, None), ()),
                        ("one fewer", drop_one, ())],
    "history_days_ago": [("nan", lambda v: first_leaf(v, NAN), ()), ("negative", lambda v: first_leaf(v, -0.5), ()),
                         ("inf", lambda v: first_leaf(v, INF), ()), ("one fewer", drop_one, ())],
    "history_watch_fraction": [("7.5", lambda v: first_leaf(v, 7.5), ()), ("negative", lambda v: first_leaf(v, -0.1), ()),
                               ("nan", lambda v: first_leaf(v, NAN), ()), ("null", lambda v: first_leaf(v, None), ())],
    "page_row_ids": [("null", lambda v: None, ()), ("no rows", lambda v: [], ()),
                     ("unknown row", lambda v: first_leaf(v, "holiday_specials"), ()),
                     ("row twice", lambda v: [v[0]] + v[:-1] if len(v) > 1 else SKIP, ()),
                     ("whitespace", lambda v: first_leaf(v, "genre action"), ()),
                     ("one fewer", drop_one, ("page_entity_ids",))],
    "page_entity_ids": [("null", lambda v: None, ()), ("empty row", lambda v: [[]] + v[1:], ()),
                        ("title twice", lambda v: [[v[0][0]] + v[0][:-1]] + v[1:] if len(v[0]) > 1 else SKIP, ()),
                        ("title twice across rows", lambda v: [v[0], [v[0][0]] + v[1][1:]] + v[2:] if len(v) > 1 else SKIP, ()),
                        ("whitespace", lambda v: first_leaf(v, "movie\t1"), ()),
                        ("null id", lambda v: first_leaf(v, None), ()),
                        ("one fewer title", lambda v: [v[0][1:]] + v[1:] if len(v[0]) > 1 else SKIP,
                         ("feedback", "play_minutes", "thumbs_up", "entity_rewards"))],
    "feedback": [("unknown", lambda v: first_leaf(v, "watched"), ()), ("one fewer", lambda v: [v[0][1:]] + v[1:], ()),
                 ("null", lambda v: first_leaf(v, None), ())],
    "play_minutes": [("negative", lambda v: first_leaf(v, -5.0), ()), ("nan", lambda v: first_leaf(v, NAN), ()),
                     ("one fewer row", drop_one, ())],
    "thumbs_up": [("one fewer", lambda v: [v[0][1:]] + v[1:], ()), ("null", lambda v: first_leaf(v, None), ())],
    "entity_rewards": [("inf", lambda v: first_leaf(v, INF), ()), ("nan", lambda v: first_leaf(v, NAN), ()),
                       ("off the reward system", lambda v: first_leaf(v, 7.0), ("page_reward",)),
                       ("one fewer", lambda v: [v[0][1:]] + v[1:], ())],
    "page_reward": [("null", lambda v: None, ()), ("nan", lambda v: NAN, ()), ("+3", lambda v: v + 3.0, ())],
    "rows_viewed": [("negative", lambda v: -1, ()), ("beyond the page", lambda v: 9, ())],
}
ROW_FIELDS = sorted(MUTATIONS)


def mutate(table: pa.Table, row: int, name: str, k: int):
    """(mutated table, the fields the refusal may name) or None when this mutation does not apply to the row."""
    _, edit, partners = MUTATIONS[name][k % len(MUTATIONS[name])]
    value = table.column(name)[row].as_py()
    new = table.column("impression_id")[0].as_py() if edit == "DUPLICATE" else edit(value)
    if new is SKIP:
        return None
    return set_cell(table, name, row, new), {name, *partners}


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_one_mutated_row_is_named_with_its_field(tmp_path, table, data):
    name = data.draw(st.sampled_from(ROW_FIELDS), "field")
    k = data.draw(st.integers(0, 5), "mutation")
    row = data.draw(st.integers(1, N_ROWS - 1), "row")  # row 0 is the source of the duplicated id
    mutated = mutate(table, row, name, k)
    assume(mutated is not None)
    bad, fields = mutated
    path = write(tmp_path / "log.parquet", bad)
    with pytest.raises(LogSchemaError) as exc:  # anything else fails the test: a foreign exception
        read_logs(path, CONTEXT["schema"])
    m = re.search(r"log.parquet: row (\d+), field '(\w+)'", str(exc.value))
    assert m and int(m.group(1)) == row and m.group(2) in fields, (name, k, str(exc.value))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_quarantine_sets_aside_exactly_the_mutated_rows(tmp_path, table, data):
    rows = data.draw(st.lists(st.integers(1, N_ROWS - 1), min_size=1, max_size=6, unique=True), "rows")
    bad, expected = table, {}
    for row in rows:
        name = data.draw(st.sampled_from(ROW_FIELDS), "field")
        mutated = mutate(bad, row, name, data.draw(st.integers(0, 5), "mutation"))
        if mutated is not None:
            bad, fields = mutated
            expected[row] = fields
    path = write(tmp_path / "log.parquet", bad)
    kept, report = read_logs(path, CONTEXT["schema"], on_bad_rows="quarantine", max_bad_fraction=1.0)
    q = report.quarantine
    assert sorted(q.row) == sorted(expected), (q.row, q.field, q.detail)
    for row, name in zip(q.row, q.field):
        assert name in expected[row], (row, name, expected[row])
    assert kept.num_rows + len(q) == N_ROWS
    assert set(kept.column("impression_id").to_pylist()) == {
        i for r, i in enumerate(table.column("impression_id").to_pylist()) if r not in expected}


def file_mutations(table: pa.Table, tmp_path) -> dict:
    """name -> a path to a broken log file."""
    def retyped(name, values):
        return table.set_column(table.column_names.index(name), name, values)

    raw = tmp_path / "valid.parquet"
    write(raw, table)
    blob = raw.read_bytes()
    out = {}
    for name in LOG_SCHEMA.names:
        if name not in {"split", "rows_viewed", "policy"}:
            out[f"no {name}"] = table.drop_columns([name])
        scalar = pa.types.is_list(LOG_SCHEMA.field(name).type) is False
        out[f"{name} retyped"] = retyped(name, pa.array([[1.5]] * table.num_rows) if scalar else
                                         pa.array([{"a": 1}] * table.num_rows))
    out["unknown column"] = table.append_column("clicks", pa.array(np.ones(table.num_rows)))
    paths = {}
    for name, t in out.items():
        paths[name] = write(tmp_path / f"{len(paths)}.parquet", t)
    for cut in (0, 8, len(blob) // 2, len(blob) - 9):
        (tmp_path / f"cut{cut}.parquet").write_bytes(blob[:cut])
        paths[f"cut at byte {cut}"] = str(tmp_path / f"cut{cut}.parquet")
    (tmp_path / "junk.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
    paths["random bytes"] = str(tmp_path / "junk.parquet")
    pq.write_table(table.replace_schema_metadata({b"genpage.schema_version": b"2"}), tmp_path / "v2.parquet")
    paths["schema version 2"] = str(tmp_path / "v2.parquet")
    return paths


@pytest.mark.parametrize("mode", ["error", "quarantine"])
def test_broken_files_are_refused_naming_the_file_in_either_mode(tmp_path, table, mode):
    paths = file_mutations(table, tmp_path)
    assert len(paths) >= 45
    for name, path in paths.items():
        with pytest.raises(LogSchemaError) as exc:
            read_logs(path, CONTEXT["schema"], on_bad_rows=mode, max_bad_fraction=1.0)
        assert path in str(exc.value), (name, str(exc.value))


def test_every_field_of_the_schema_is_fuzzed():
    assert set(ROW_FIELDS) | {"policy"} == set(LOG_SCHEMA.names)  # policy is free text: only its type can be wrong
