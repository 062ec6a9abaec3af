"""The store's Parquet files (sample indexes) to and from bytes: the one place that does it.

Reads go through `pq.ParquetFile(...).read()` on a native buffer, single-threaded, never
through `pq.read_table`: `read_table` scans with the dataset API, whose scanner threads can
still be alive when the interpreter exits, and the process then aborts with SIGABRT
("terminate called without an active exception", exit status 134) after its work is done,
in about one run in twenty here (a known pyarrow problem). Sample indexes are read once per
open, so one thread is fast enough.
"""

from __future__ import annotations

import io
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def table_from_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """The table held by the Parquet file `data` (only `columns` when given)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(
        columns=list(columns) if columns is not None else None, use_threads=False)


def table_to_bytes(table: pa.Table) -> bytes:
    """`table` as a zstd-compressed Parquet file."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
