"""Editing log tables the way a buggy producer would (shared by the log and validation tests)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from homepage.logs import LOG_SCHEMA

LOG_ROWS = 50  # impressions in the `log_table` fixture


def set_cell(table: pa.Table, field: str, row: int, value) -> pa.Table:
    """`table` with one cell replaced (the column keeps its type)."""
    values = table.column(field).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(field), field, pa.array(values, table.schema.field(field).type))


def write_log(path, table: pa.Table, metadata: bool = True):
    """Writes `table` as a log part, as it is (malformed tables too), with the schema version when `metadata`."""
    pq.write_table(table.replace_schema_metadata(LOG_SCHEMA.metadata if metadata else None), path)
    return path
