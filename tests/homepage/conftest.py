"""What the log tests share: the toy dataset's schema and a valid log table of the small world."""

import pyarrow as pa
import pytest

from homepage.logs import batch_to_table
from tests.homepage.helpers import LOG_ROWS
from tests.toy import world_dataset


@pytest.fixture(scope="session")
def toy_schema(small_world, tmp_path_factory):
    """The DatasetSchema make_world writes for the small world (closed vocabularies, row taxonomy, rewards)."""
    return world_dataset(small_world, tmp_path_factory.mktemp("data")).schema


@pytest.fixture(scope="session")
def log_table(small_world) -> pa.Table:
    """LOG_ROWS valid impressions of the small world, in LOG_SCHEMA."""
    return batch_to_table(next(small_world.iter_logs(LOG_ROWS)), small_world)
