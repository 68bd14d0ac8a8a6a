import dataclasses

import numpy as np
import pytest

from homepage.world import World, WorldConfig

SMALL = WorldConfig(seed=3, n_entities=120, n_users=200, n_impressions=600, batch_size=256)


@pytest.fixture(scope="session")
def small_world() -> World:
    """A small but complete world (all rows populated), shared read-only by tests."""
    return World.generate(SMALL)


@pytest.fixture
def controlled_world() -> World:
    """A fresh small world whose tests may overwrite hidden attributes to build controlled cases."""
    return World.generate(dataclasses.replace(SMALL, seed=11))


def neutralize(world: World, user: int, entities: np.ndarray) -> None:
    """Makes `entities` equally liked by `user`: same hidden factors, quality, popularity, language;
    not new, not watched. Content embeddings are left for the test to set."""
    c, u = world.catalog, world.users
    c.latent[entities] = c.latent[entities[0]]
    c.quality[entities] = 0.5
    c.popularity[entities] = 1.0
    c.language[entities] = u.language[user]
    c.release_day[entities] = -1000
    c.maturity[entities] = 0
    u.resume[user, entities] = False
    u.completed[user, entities] = False
    u.profile_type[user] = 0
