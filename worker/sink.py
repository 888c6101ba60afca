"""Writing result shards: a temporary file, fsync, then an atomic rename.

A reader (or a resumed job) sees either a whole shard or none: a crash leaves
at most a hidden ``.tmp`` file, which the next run removes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from worker.errors import OutputError

TEMP_MARK = ".tmp-"


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(directory: Path) -> None:
    for stale in directory.glob(f".*{TEMP_MARK}*"):
        stale.unlink(missing_ok=True)


class ShardWriter:
    """Append tables to one shard; ``commit`` makes it visible, ``abort`` removes it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.final = directory / name
        self.temporary = directory / f".{name}{TEMP_MARK}{os.getpid()}"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.temporary, table.schema, compression="zstd")
            elif table.schema != self._writer.schema:
                table = table.cast(self._writer.schema)
            self._writer.write_table(table)
        except OSError as error:
            self.abort()
            raise OutputError(f"{self.final}: write failed: {error}") from error
        self.rows += table.num_rows

    def commit(self) -> Path:
        if self._writer is None:
            raise OutputError(f"{self.final}: nothing was written to this shard")
        try:
            self._writer.close()
            self._writer = None
            with open(self.temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(self.temporary, self.final)
            fsync_directory(self.final.parent)
        except OSError as error:
            self.abort()
            raise OutputError(f"{self.final}: write failed: {error}") from error
        return self.final

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass  # the file is deleted next; a close error on a broken disk changes nothing
            self._writer = None
        self.temporary.unlink(missing_ok=True)
