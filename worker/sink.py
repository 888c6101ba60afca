"""Writing result shards: Parquet into a hidden temporary file, committed atomically (``worker.atomic``).

A reader (or a resumed job) sees either a whole shard or none: a crash leaves
at most a hidden ``.tmp`` file, which the next run removes.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from worker.atomic import commit, temporary_path
from worker.errors import OutputError


class ShardWriter:
    """Append tables to one shard; ``commit`` makes it visible, ``abort`` removes it."""

    def __init__(self, directory: Path, name: str, temporary: Path | None = None) -> None:
        self.final = directory / name
        # The Ray engine's workers pass a name unique to their attempt (``worker.commit``).
        self.temporary = temporary or temporary_path(self.final)
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        try:
            if self._writer is None:
                self.temporary.unlink(missing_ok=True)  # a file (or symlink) left under this name is never written through
                self._writer = pq.ParquetWriter(self.temporary, table.schema, compression="zstd")
            elif table.schema != self._writer.schema:
                table = table.cast(self._writer.schema)
            self._writer.write_table(table)
        except OSError as error:
            self.abort()
            raise OutputError(f"{self.final}: write failed: {error}") from error
        self.rows += table.num_rows

    def close(self) -> None:
        """Finish the temporary file (its Parquet footer) without making it visible."""
        if self._writer is None:
            raise OutputError(f"{self.final}: nothing was written to this shard")
        try:
            self._writer.close()
            self._writer = None
        except OSError as error:
            self.abort()
            raise OutputError(f"{self.final}: write failed: {error}") from error

    def commit(self) -> Path:
        self.close()
        try:
            commit(self.temporary, self.final)
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
