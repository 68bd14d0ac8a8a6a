"""The dataset directory contract on a dataset unlike the toy world (tests/datasets/music.py): it loads, its rows
mean what dataset.yaml says, and each kind of bad input is refused with the file, the row or field, and the fix."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from homepage.dataset import DatasetError, load_dataset, open_dataset
from homepage.logs import LOG_SCHEMA, LogSchemaError
from tests.datasets import music


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return music.write(tmp_path_factory.mktemp("music"), n_titles=200, n_users=300, n_impressions=600, seed=1)


@pytest.fixture
def data(source, tmp_path):
    """A private copy to break."""
    return shutil.copytree(source, tmp_path / "music")


def edit_yaml(root, fn):
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    fn(spec)
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def edit_catalog(root, name, fn):
    table = pq.read_table(root / "catalog.parquet")
    i = table.schema.get_field_index(name)
    table = table.set_column(i, table.schema.field(i), fn(table.column(name)))
    pq.write_table(table, root / "catalog.parquet")


def test_rows_mean_what_dataset_yaml_says(source):
    ds = load_dataset(source)
    s = ds.schema
    assert len(s.rows) == 30 and s.entity_types == ("track",) and s.embedding_dim == 32
    assert [r.id for r in s.rows[:2]] == ["genre_pop", "genre_rock"]  # templates expand in their values' order
    elig = ds.row_eligibility()
    genres = ds.catalog.column("genres").to_pylist()
    assert (elig["genre_jazz"] == np.array(["jazz" in g for g in genres])).all()
    assert (elig["mood_calm"] == (ds.catalog.column("mood").to_numpy(zero_copy_only=False) == "calm")).all()
    age = np.array([(music.AS_OF - d).days for d in ds.catalog.column("release_date").to_pylist()])
    assert (elig["new_this_week"] == (age < 7)).all() and (elig["fresh_finds"] == (age < 60)).all()
    assert elig["all_tracks"].all() and "jump_back_in" not in elig  # history rows are per prompt
    editors = set(next(r for r in s.rows if r.id == "editors_choice").entities)
    assert elig["editors_choice"].sum() == len(editors)
    assert (ds.allowed_for_profile()["family"] == ds.catalog.column("family_safe").to_numpy(zero_copy_only=False)).all()
    assert ds.content_matrix().shape == (200, 32)


def test_learned_vocabulary_keeps_values_above_min_count(source):
    from policies.tokenizer import EncodeStats, GenPageTokenizer

    ds, table, _ = open_dataset(source)
    tok = GenPageTokenizer.from_dataset(ds, table)
    train = table.filter(pc.equal(table.column("split"), "train")).column("language").to_pylist()
    want = sorted(v for v in set(train) if train.count(v) >= 40)
    assert list(tok.context_vocab.languages) == want and "yo" not in want  # rare: 2% of users
    stats = EncodeStats()
    from homepage.logs import iter_impressions

    for imp in iter_impressions(table):
        tok.encode(imp, stats)
    assert stats.by_field.get("lang", 0) == sum(v not in want for v in table.column("language").to_pylist())


def test_a_row_naming_a_missing_catalog_column(data):
    edit_yaml(data, lambda s: s["rows"].append({"id": "loud", "kind": "boolean", "column": "is_loud"}))
    with pytest.raises(DatasetError, match=r"dataset.yaml: rows\[8\]: column 'is_loud' is not a column of .*catalog.parquet.*add the column"):
        load_dataset(data)


def test_an_entity_id_with_whitespace(data):
    edit_catalog(data, "entity_id", lambda c: pa.array([("trk 000003" if i == 3 else v) for i, v in enumerate(c.to_pylist())]))
    with pytest.raises(DatasetError, match=r"catalog.parquet: row 3, field 'entity_id': 'trk 000003' contains whitespace.*replace"):
        load_dataset(data)


def test_an_embedding_of_the_wrong_size(data):
    edit_catalog(data, "content_embedding", lambda c: pa.array(
        [(v[:31] if i == 17 else v) for i, v in enumerate(c.to_pylist())], pa.list_(pa.float32())))
    with pytest.raises(DatasetError, match=r"row 17, field 'content_embedding': 31 values, expected 32"):
        load_dataset(data)


def test_a_context_value_outside_a_closed_vocabulary(data):
    edit_yaml(data, lambda s: s["context"]["device"].update(values=["car", "watch", "desktop", "phone"]))
    with pytest.raises(LogSchemaError, match=r"part-00000.parquet: row \d+, field 'device': value 'smart_speaker'.*context.device"):
        open_dataset(data)


def test_a_row_id_in_the_logs_with_no_definition(data):
    edit_yaml(data, lambda s: s["rows"].__setitem__(slice(None), [r for r in s["rows"] if r.get("id") != "fresh_finds"]))
    with pytest.raises(LogSchemaError, match=r"row \d+, field 'page_row_ids': value 'fresh_finds'.*'rows' in dataset.yaml"):
        open_dataset(data)


def test_a_reward_table_whose_feedback_types_differ_from_the_logs(data):
    def rename(s):
        s["rewards"]["feedback"] = {("replay" if k == "repeat" else k): v for k, v in s["rewards"]["feedback"].items()}
    edit_yaml(data, rename)
    with pytest.raises(LogSchemaError, match=r"row \d+, field 'feedback': value 'repeat'.*rewards.feedback"):
        open_dataset(data)
    edit_yaml(data, lambda s: s["rewards"].update(feedback={**music.REWARDS, "repeat": 4.0}))  # same names, other values
    with pytest.raises(LogSchemaError, match=r"field 'entity_rewards': does not follow the reward system.*'rewards'"):
        open_dataset(data)


def test_recency_rows_need_dates_and_an_as_of(data):
    edit_yaml(data, lambda s: s.pop("as_of"))
    with pytest.raises(DatasetError, match="recency rows need the dataset's 'as_of'"):
        load_dataset(data)


def test_a_checkpoint_from_another_dataset_is_refused(source, small_world, tmp_path):
    from policies.tokenizer import check_tokenizer_matches
    from tests.toy import world_tokenizer

    ds, table, _ = open_dataset(source)
    with pytest.raises(DatasetError, match=r"the checkpoint was made from another dataset than .*tokens only in one"):
        check_tokenizer_matches(world_tokenizer(small_world), ds, table, "the checkpoint")


class NoTruth:
    def __init__(self, dataset):
        pass


def test_environments_load_by_dotted_path_or_not_at_all(source):
    from homepage.environment import load_environment

    ds = load_dataset(source)
    assert ds.schema.environment is None
    assert load_environment("", ds) is None and load_environment("auto", ds) is None  # the dataset declares none
    env = load_environment("tests.datasets.music:FamilySafeShare", ds)
    assert env.true_page_reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="cannot be imported"):
        load_environment("tests.nowhere:Truth", ds)
    with pytest.raises(ValueError, match="no true_page_reward"):
        load_environment("tests.homepage.test_dataset:NoTruth", ds)


def test_rule_tables_are_bit_packed_masks():
    from policies.rules import pack_mask, unpack_mask

    mask = np.zeros(21, dtype=bool)
    mask[[0, 7, 8, 20]] = True
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.shape == (3,)  # 21 bits -> 3 bytes
    assert unpack_mask(packed, 21).numpy().tolist() == mask.tolist()


def test_an_entity_type_the_schema_does_not_declare(data):
    edit_catalog(data, "entity_type", lambda c: pa.array([("podcast" if i == 9 else v) for i, v in enumerate(c.to_pylist())]))
    with pytest.raises(DatasetError, match=r"catalog.parquet: row 9, field 'entity_type': 'podcast' is not one of .*add it"):
        load_dataset(data)


# -- the validated-logs cache (homepage.dataset.cached_logs) ----------------------------------------------------------
def break_hour(root, row: int = 3):
    """One log row out of range (hour 30), the rest unchanged."""
    from tests.homepage.helpers import set_cell, write_log

    part = root / "logs" / "part-00000.parquet"
    write_log(part, set_cell(pq.read_table(part), "hour", row, 30))


def test_validated_logs_are_cached_memory_mapped_and_equal(data, tmp_path):
    cache = tmp_path / "cache"
    _, memory, mem_report = open_dataset(data)
    _, first, r1 = open_dataset(data, cache_dir=cache)
    allocated = pa.total_allocated_bytes()
    _, again, r2 = open_dataset(data, cache_dir=cache)
    assert pa.total_allocated_bytes() - allocated < 2**16  # mapped from the file, not copied into memory
    assert first.equals(memory) and again.equals(memory)
    assert not r1.from_cache and r2.from_cache
    for report in (r1, r2):
        assert (report.rows, report.rows_read, report.filled, report.unknown_entities) == (
            mem_report.rows, mem_report.rows_read, mem_report.filled, mem_report.unknown_entities)
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # one entry, no temporary left
    # Other log bytes: another entry, validated again.
    part = data / "logs" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).slice(0, 100).replace_schema_metadata(LOG_SCHEMA.metadata), part)
    _, fewer, r3 = open_dataset(data, cache_dir=cache)
    assert not r3.from_cache and fewer.num_rows == 100 and len(list(cache.iterdir())) == 2


def test_cached_logs_keep_the_quarantine_and_never_cache_a_refused_log(data, tmp_path):
    cache = tmp_path / "cache"
    break_hour(data)
    with pytest.raises(LogSchemaError, match="hour"):
        open_dataset(data, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []  # the refused validation left nothing behind
    _, memory, expected = open_dataset(data, "quarantine", 0.1, tmp_path / "memory.parquet")
    _, first, r1 = open_dataset(data, "quarantine", 0.1, tmp_path / "a" / "q.parquet", cache)
    _, again, r2 = open_dataset(data, "quarantine", 0.1, tmp_path / "b" / "q.parquet", cache)
    assert r2.from_cache and again.equals(memory) and first.equals(memory)
    for report in (r1, r2):
        assert report.quarantined == 1 and report.bad_row_reasons() == expected.bad_row_reasons()
        assert pq.read_table(report.quarantine_file).equals(pq.read_table(tmp_path / "memory.parquet"))
    assert r2.quarantine_file == str(tmp_path / "b" / "q.parquet")


def test_a_killed_writers_temporary_entry_is_removed_by_the_next_writer(data, tmp_path):
    import subprocess

    from homepage.dataset import logs_key

    cache = tmp_path / "cache"
    key = logs_key(load_dataset(data), "error", 0.0)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    stale, live = cache / f".tmp_{key}_{gone.pid}", cache / f".tmp_{key}_1"  # pid 1 always runs
    for d in (stale, live):
        (d / "part").mkdir(parents=True)
    _, _, report = open_dataset(data, cache_dir=cache)
    assert not report.from_cache and not stale.exists() and live.exists() and (cache / key / "logs.arrow").exists()


def test_above_max_bad_fraction_the_stage_quarantine_file_is_there_to_read(data, tmp_path):
    break_hour(data)
    with pytest.raises(LogSchemaError, match="max_bad_fraction"):
        open_dataset(data, "quarantine", 0.0, tmp_path / "out" / "quarantine.parquet", tmp_path / "cache")
    assert pq.read_table(tmp_path / "out" / "quarantine.parquet").num_rows == 1
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_copy_of_the_dataset_elsewhere_has_its_own_entry_naming_its_own_files(data, tmp_path):
    break_hour(data)
    copy = shutil.copytree(data, tmp_path / "copy")
    _, _, here = open_dataset(data, "quarantine", 0.1, None, tmp_path / "cache")
    _, _, there = open_dataset(copy, "quarantine", 0.1, None, tmp_path / "cache")
    assert not there.from_cache and there.quarantine.part == [str(copy / "logs" / "part-00000.parquet")]
    assert here.quarantine.part == [str(data / "logs" / "part-00000.parquet")]
