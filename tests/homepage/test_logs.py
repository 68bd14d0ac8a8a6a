import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from homepage.logs import LOG_SCHEMA, LogSchemaError, LogWriter, iter_impressions, read_logs
from tests.homepage.helpers import set_cell, write_log

SCHEMA = {}  # the toy dataset's schema, set once by the `dataset_schema` fixture


@pytest.fixture(scope="module", autouse=True)
def dataset_schema(toy_schema):
    SCHEMA["toy"] = toy_schema


@pytest.fixture
def table(log_table):
    return log_table


def write(tmp_path, table, name="logs.parquet", metadata=True):
    return write_log(tmp_path / name, table, metadata)


def test_write_read_round_trip(tmp_path, table, small_world):
    path = tmp_path / "logs.parquet"
    with LogWriter(path) as writer:
        writer.write(table.slice(0, 25))
        writer.write(table.slice(25))
    back, report = read_logs(path, SCHEMA["toy"], known_entity_ids=frozenset(small_world.catalog.entity_ids))
    assert back.equals(table)
    assert report.rows == 50 and report.unknown_entities == 0
    assert pq.ParquetFile(path).schema_arrow.metadata[b"genpage.schema_version"] == b"1"
    imps = list(iter_impressions(back))
    assert imps[3].page.entity_ids == [e for row in table.column("page_entity_ids")[3].as_py() for e in row]
    assert imps[3].page_reward == pytest.approx(sum(sum(r) for r in imps[3].entity_rewards), abs=1e-4)


def test_directory_of_parts_is_read_as_one_log(tmp_path, table):
    (tmp_path / "logs").mkdir()
    write(tmp_path / "logs", table.slice(0, 20), "part-0.parquet")
    write(tmp_path / "logs", table.slice(20), "part-1.parquet")
    back, report = read_logs(tmp_path / "logs")
    assert back.num_rows == 50 and report.rows == 50


def expect_error(tmp_path, table, *patterns):
    path = write(tmp_path, table)
    with pytest.raises(LogSchemaError) as exc:
        read_logs(path, SCHEMA["toy"])
    msg = str(exc.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)


def test_missing_required_field_is_named(tmp_path, table):
    expect_error(tmp_path, table.drop_columns(["page_reward"]), "missing required field 'page_reward'")


def test_bad_enum_in_nested_feedback_names_row_and_field(tmp_path, table):
    fb = table.column("feedback").to_pylist()
    fb[7][1][0] = "watched"
    bad = set_cell(table, "feedback", 7, fb[7])
    expect_error(tmp_path, bad, r"row 7\b", "field 'feedback'", "'watched'")


def test_page_reward_not_sum_of_entity_rewards(tmp_path, table):
    bad = set_cell(table, "page_reward", 12, table.column("page_reward")[12].as_py() + 3.0)
    expect_error(tmp_path, bad, r"row 12\b", "field 'page_reward'", "sum of entity rewards")


def test_misaligned_slot_field(tmp_path, table):
    rewards = table.column("entity_rewards").to_pylist()
    rewards[4][0] = rewards[4][0][:-1]
    bad = set_cell(table, "entity_rewards", 4, rewards[4])
    expect_error(tmp_path, bad, r"row 4\b", "field 'entity_rewards'")


def test_hour_out_of_range_and_null(tmp_path, table):
    expect_error(tmp_path, set_cell(table, "hour", 9, 30), r"row 9\b", "field 'hour'", "0..23")
    expect_error(tmp_path, set_cell(table, "user_id", 2, None), r"row 2\b", "field 'user_id'", "null")


def test_reward_not_following_reward_system(tmp_path, table):
    rewards = table.column("entity_rewards").to_pylist()
    fb = table.column("feedback").to_pylist()
    rewards[5][0][0] = 7.0
    bad = set_cell(table, "entity_rewards", 5, rewards[5])
    bad = set_cell(bad, "page_reward", 5, float(sum(sum(r) for r in rewards[5])))
    assert fb[5][0][0] in ("none", "abandon", "short_play", "long_play", "binge")
    expect_error(tmp_path, bad, r"row 5\b", "field 'entity_rewards'", "reward system")


def test_wrong_type_and_unknown_field(tmp_path, table):
    bad = table.set_column(table.column_names.index("page_reward"), "page_reward", pa.array(["x"] * table.num_rows))
    expect_error(tmp_path, bad, "field 'page_reward' has type string")
    expect_error(tmp_path, table.append_column("clicks", pa.array([1] * table.num_rows)), r"unknown field\(s\) \['clicks'\]")


def test_corrupt_file_and_wrong_version(tmp_path, table):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(LogSchemaError, match="junk.parquet: not a readable Parquet file"):
        read_logs(junk)
    path = tmp_path / "v9.parquet"
    pq.write_table(table.replace_schema_metadata({b"genpage.schema_version": b"9"}), path)
    with pytest.raises(LogSchemaError, match="schema version '9'"):
        read_logs(path)
    with pytest.raises(FileNotFoundError, match="make_world.py"):
        read_logs(tmp_path / "missing.parquet")


def test_unknown_entities_are_kept_and_counted(tmp_path, table, small_world):
    ents = table.column("page_entity_ids").to_pylist()
    ents[3][0][0] = "movie_new_release_x"
    hist = table.column("history_entity_ids").to_pylist()
    hist[8][0] = "show_from_other_catalog"
    bad = set_cell(set_cell(table, "page_entity_ids", 3, ents[3]), "history_entity_ids", 8, hist[8])
    back, report = read_logs(write(tmp_path, bad), known_entity_ids=frozenset(small_world.catalog.entity_ids))
    assert back.num_rows == table.num_rows
    assert report.unknown_entities == 2 and report.rows_with_unknown == 2
    assert "2 unknown entity ids in 2 impressions" in report.summary()


def test_byo_logs_without_optional_fields(tmp_path, table):
    bare = table.drop_columns(["split", "rows_viewed", "policy"])
    back, report = read_logs(write(tmp_path, bare, metadata=False))
    assert report.filled == {"split": table.num_rows}
    assert set(back.column("split").to_pylist()) <= {"train", "valid", "test"}
    # The derived split is a function of the user: no user in two splits.
    pairs = set(zip(back.column("user_id").to_pylist(), back.column("split").to_pylist()))
    assert len(pairs) == len(set(back.column("user_id").to_pylist()))


def test_schema_documents_every_field():
    doc = (Path(__file__).parents[2] / "docs" / "log_schema.md").read_text()
    for f in LOG_SCHEMA:
        assert f"`{f.name}`" in doc, f"docs/log_schema.md does not document {f.name}"


def test_writer_refuses_a_table_off_schema(tmp_path, table):
    with pytest.raises(LogSchemaError, match=r"missing \['page_reward'\]"):
        with LogWriter(tmp_path / "x.parquet") as writer:
            writer.write(table.drop_columns(["page_reward"]))


def test_values_outside_the_dataset_schema_are_named(tmp_path, table):
    """Closed vocabularies, row ids and feedback types come from dataset.yaml, not from module constants."""
    expect_error(tmp_path, set_cell(table, "device", 3, "smart_fridge"), r"row 3\b", "field 'device'", "context.device")
    rows = table.column("page_row_ids").to_pylist()
    rows[6][0] = "holiday_specials"
    expect_error(tmp_path, set_cell(table, "page_row_ids", 6, rows[6]), r"row 6\b", "'holiday_specials'", "'rows'")


def test_other_page_of_user_is_the_users_next_logged_page(table):
    from homepage.logs import other_page_of_user

    imps = list(iter_impressions(table))
    users = [i.context.user_id for i in imps]
    out = other_page_of_user(imps, table)
    for k, (imp, page) in enumerate(zip(imps, out)):
        rows = [j for j, u in enumerate(users) if u == imp.context.user_id and j != k]
        if not rows:
            assert page is None
        else:  # the next one in log order, else the first
            assert page == imps[next((j for j in rows if j > k), rows[0])].page
    assert any(p is not None for p in out) and any(p is None for p in out)


def test_parts_with_other_optional_fields_read_as_one_table(tmp_path, table):
    """One part with every field, one without the optional ones: the table has the first part's columns, the
    second part's split derived and its rows_viewed and policy null; written batch by batch to an Arrow file
    (out_file), the same table comes back memory-mapped."""
    (tmp_path / "logs").mkdir()
    write(tmp_path / "logs", table.slice(0, 20), "part-0.parquet")
    write(tmp_path / "logs", table.slice(20).drop_columns(["split", "rows_viewed", "policy"]), "part-1.parquet")
    back, report = read_logs(tmp_path / "logs", SCHEMA["toy"])
    assert back.schema.names == table.schema.names and report.filled == {"split": table.num_rows - 20}
    assert back.column("split").null_count == 0 and back.column("policy").null_count == table.num_rows - 20
    assert back.slice(0, 20).equals(table.slice(0, 20))
    mapped, _ = read_logs(tmp_path / "logs", SCHEMA["toy"], out_file=tmp_path / "logs.arrow")
    assert mapped.equals(back)


def test_rows_where_counts_rows_across_chunks_and_reads_null_as_false():
    from homepage.logs import rows_where

    mask = pa.chunked_array([pa.array([True, False, None]), pa.array([], pa.bool_()), pa.array([False, True])])
    assert rows_where(mask).tolist() == [0, 4]
    assert rows_where(pa.array([False, True])).tolist() == [1]
