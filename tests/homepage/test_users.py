"""homepage/users.py: the per-user title sets read like the dense [U, N] boolean they stand for, and history
sampling in chunks of users draws what one [U, N] draw would."""

import json

import numpy as np
import pytest

import homepage.users as users_module
from homepage.users import UserTitleSets, history_titles
from homepage.world import World

DENSE = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=bool)  # 3 users, 5 titles


def test_title_sets_index_like_the_dense_boolean():
    sets = UserTitleSets.from_dense(DENSE)
    assert sets.shape == (3, 5) and sets.titles.shape == (3, 2)
    np.testing.assert_array_equal(sets.dense(), DENSE)
    np.testing.assert_array_equal(sets[2], DENSE[2])
    users = np.array([2, 0, 0, 1])
    np.testing.assert_array_equal(sets[users], DENSE[users])
    ents = np.array([[[0, 4], [1, 2]], [[4, 4], [3, 0]], [[1, 0], [2, 2]], [[0, 1], [2, 3]]])  # [B, R, L]
    np.testing.assert_array_equal(sets[users[:, None, None], ents], DENSE[users[:, None, None], ents])
    np.testing.assert_array_equal(sets[0, np.array([1, 2, 4])], DENSE[0, [1, 2, 4]])
    np.testing.assert_array_equal(sets.any(1), DENSE.any(1))


def test_removing_titles_from_a_users_set():
    sets = UserTitleSets.from_dense(DENSE)
    sets[0, np.array([4, 3])] = False
    expected = DENSE.copy()
    expected[0, [4, 3]] = False
    np.testing.assert_array_equal(sets.dense(), expected)
    with pytest.raises(TypeError, match="only sets"):
        sets[0, np.array([2])] = True


def test_history_in_chunks_of_users_is_the_one_draw_history(small_world, monkeypatch):
    """Chunks of 7 users and one chunk of all: the same titles and appeal from the same generator state."""
    c, u = small_world.catalog, small_world.users
    whole = history_titles(np.random.default_rng(5), c, u.taste, u.profile_type, 12)
    monkeypatch.setattr(users_module, "USER_CHUNK_CELLS", 7 * c.n)
    chunked = history_titles(np.random.default_rng(5), c, u.taste, u.profile_type, 12)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    # no title twice, no mature title for a kids profile
    assert all(len(set(r)) == 12 for r in whole[0])
    kids = u.profile_type == 1
    assert c.kids_safe[whole[0][kids]].all()


def test_a_world_saved_with_dense_sets_still_loads(small_world, tmp_path):
    small_world.save(tmp_path)
    with np.load(tmp_path / "world_state.npz") as f:
        arrays = dict(f)
    for name in ("resume", "completed"):  # the earlier format: [U, N] booleans
        arrays[f"users.{name}"] = getattr(small_world.users, name).dense()
    np.savez_compressed(tmp_path / "world_state.npz", **arrays)
    assert json.loads((tmp_path / "world.json").read_text())["format_version"]
    loaded = World.load(tmp_path)
    for name in ("resume", "completed"):
        np.testing.assert_array_equal(getattr(loaded.users, name).dense(), getattr(small_world.users, name).dense())
