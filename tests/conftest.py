import dataclasses

import pytest

from homepage.world import World
from tests.toy import SMALL


@pytest.fixture(scope="session")
def small_world() -> World:
    """A small but complete world (all rows populated), shared read-only by tests."""
    return World.generate(SMALL)


@pytest.fixture
def controlled_world() -> World:
    """A fresh small world whose tests may overwrite hidden attributes to build controlled cases."""
    return World.generate(dataclasses.replace(SMALL, seed=11))


# Fixtures that start a vLLM engine (tests/policies/conftest.py): a test that uses one, directly or through
# another fixture, is an `engine` test even when its body looks cheap; the fast tier deselects those.
ENGINE_FIXTURES = {"generation_llm"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if ENGINE_FIXTURES & set(item.fixturenames) and item.get_closest_marker("engine") is None]
    if unmarked:
        raise pytest.UsageError("these tests use a fixture that starts a vLLM engine; mark them "
                                "@pytest.mark.engine:\n  " + "\n  ".join(unmarked))
