"""rl/iteration.py without engines: the served pages logged in the dataset's schema, the round's dataset directory,
the exploration share, and the per-round figures by hand."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from homepage.dataset import open_dataset
from homepage.logs import batch_to_table, read_logs, sample_impressions
from homepage.world import SimulatorEnvironment
from rl.iteration import aggregate, explore_mask, link_dataset, results_table, round_figures
from tests.toy import world_dataset


@pytest.fixture
def base(small_world, tmp_path):
    """The small world as a dataset directory with its logs in two parts, as make_world writes them."""
    world_dataset(small_world, tmp_path / "base")
    (tmp_path / "base" / "logs").mkdir()
    for k, batch in enumerate(small_world.iter_logs()):
        pq.write_table(batch_to_table(batch, small_world), tmp_path / "base" / "logs" / f"part-{k:05d}.parquet")
    return tmp_path / "base"


def served_part(world, path, n: int, first_id: int, seed: int = 0):
    """n fresh train-split requests served the logging policy's pages of other requests (any legal pages will
    do), logged through the environment."""
    env = SimulatorEnvironment.of_world(world)
    contexts = env.sample_contexts(n, "train", seed)
    rng = np.random.default_rng(seed)
    user = world.sample_users(rng, n)
    pages = world.logging_policy.act(user, world.sample_requests(rng, user), rng).to_pages(world.catalog.entity_ids)
    table = env.log_impressions(contexts, pages, np.random.default_rng(1), first_id, "genpage_round1_seed0")
    pq.write_table(table, path)
    return contexts, pages, table


def test_served_pages_are_logged_in_the_schema_with_the_given_ids_and_policy(small_world, base, tmp_path):
    contexts, pages, _ = served_part(small_world, tmp_path / "part-r02-s0.parquet", 30, first_id=10_000)
    dataset = open_dataset(base)[0]
    table, report = read_logs(tmp_path / "part-r02-s0.parquet", dataset.schema)  # every check of the reader
    assert table.num_rows == 30 and not report.quarantine
    assert table.column("impression_id").to_pylist() == list(range(10_000, 10_030))
    assert set(table.column("policy").to_pylist()) == {"genpage_round1_seed0"}
    assert set(table.column("split").to_pylist()) == {"train"}
    assert table.column("user_id").to_pylist() == [c.user_id for c in contexts]
    assert table.column("page_entity_ids").to_pylist() == [[list(r.entity_ids) for r in p.rows] for p in pages]
    assert table.column("hour").to_pylist() == [c.hour for c in contexts]


def test_a_rounds_dataset_holds_the_base_logs_then_the_new_parts(small_world, base, tmp_path):
    dataset, table0, _ = open_dataset(base)
    new = tmp_path / "new"
    new.mkdir()
    served_part(small_world, new / "part-r02-s0.parquet", 25, first_id=10_000)
    served_part(small_world, new / "part-r03-s0.parquet", 15, first_id=10_025, seed=1)
    data = link_dataset(base, [new / "part-r02-s0.parquet", new / "part-r03-s0.parquet"], tmp_path / "round")
    _, table, _ = open_dataset(data)
    assert table.num_rows == table0.num_rows + 40
    assert table.slice(0, table0.num_rows).column("impression_id").equals(table0.column("impression_id"))
    assert table.column("impression_id").to_pylist()[table0.num_rows:] == list(range(10_000, 10_040))
    # held-out users got no served page, so every round draws the same held-out contexts
    pick = [i.impression_id for i in sample_impressions(table, "test", 20, seed=1)]
    assert pick == [i.impression_id for i in sample_impressions(table0, "test", 20, seed=1)]
    assert (data / "simulator").resolve() == (base / "simulator").resolve()
    # relinked with fewer parts: the stale link goes
    link_dataset(base, [new / "part-r02-s0.parquet"], tmp_path / "round")
    assert open_dataset(data)[1].num_rows == table0.num_rows + 25
    with pytest.raises(ValueError, match="part-00000"):
        link_dataset(base, [base / "logs" / "part-00000.parquet"], tmp_path / "clash")


def test_the_explore_share_is_exact_and_repeatable():
    mask = explore_mask(200, 0.15, seed=4)
    assert mask.sum() == 30 and mask.dtype == bool
    assert (explore_mask(200, 0.15, seed=4) == mask).all() and (explore_mask(200, 0.15, seed=5) != mask).any()
    assert not explore_mask(10, 0.0, seed=0).any() and explore_mask(10, 1.0, seed=0).all()


def fake_summary(seed: int, pre: tuple[float, float], rl: tuple[float, float], steps: int = 12) -> dict:
    """The part of a Dr. GRPO summary.json round_figures reads: (true, rm) of the start and end policy."""
    def row(true, rm):
        return {"true_reward": true, "rm_reward": rm, "diversity": 0.9, "titles_per_page": 30.0, "mask_violations": 0}

    return {"per_seed": {str(seed): {"pretrained": row(*pre), "rl": row(*rl)}}, "steps_per_seed": {str(seed): steps},
            "gap_per_step": [{"step": 1, "rollout/rm_truth_gap": 0.1}, {"step": 2, "rollout/rm_truth_gap": 0.4}]}


def test_round_figures_and_their_aggregate_by_hand():
    f = round_figures(fake_summary(0, (4.0, 4.2), (5.0, 5.6)), 0)
    assert f["start"]["rm_truth_gap"] == pytest.approx(0.2) and f["end"]["rm_truth_gap"] == pytest.approx(0.6)
    assert f["rollout_rm_truth_gap_first"] == 0.1 and f["rollout_rm_truth_gap_last"] == 0.4 and f["steps"] == 12
    rounds = {1: {0: f, 1: round_figures(fake_summary(1, (4.0, 4.2), (4.4, 4.5)), 1)},
              2: {0: round_figures(fake_summary(0, (5.0, 5.1), (6.0, 6.1)), 0) | {"served": {"true_reward": 5.1}},
                  1: round_figures(fake_summary(1, (4.4, 4.6), (5.0, 5.2)), 1) | {"served": {"true_reward": 4.5}}}}
    rows = aggregate(rounds, pretrained_true=4.0)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["true_reward"]["mean"] == pytest.approx(4.7)
    assert rows[0]["true_reward_gain"]["values"] == pytest.approx([0.25, 0.10])
    assert rows[0]["true_reward_gain"]["std"] == pytest.approx(0.15 / 2 ** 0.5)  # |a - b| / sqrt(2)
    assert rows[1]["true_reward_gain"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert rows[1]["rm_truth_gap"]["values"] == pytest.approx([0.1, 0.2])
    assert rows[1]["served_true_reward"]["mean"] == pytest.approx(4.8) and "served_true_reward" not in rows[0]
    table = results_table(rows, 4.0, 4.3)
    assert "| logging policy | | 4.300 |" in table and "+37.5%" in table and table.count("\n") == 6
