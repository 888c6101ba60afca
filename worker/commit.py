"""The shard commit protocol: workers write attempts, the process that holds the output lock commits them.

The output-committer pattern of Hadoop and Spark, with one rename per shard:

1. A worker writes a shard into a hidden file unique to its attempt, in the output directory
   itself (``.part-00000-00001.parquet.tmp-<attempt>``), so the final rename never crosses a
   filesystem: ``AttemptWriter``. Once the file is complete and fsynced it returns a
   ``ShardRecord`` (name, attempt, counts, size, checksum; a few hundred bytes) and nothing else.
2. The driver commits, one shard at a time, in whatever order the records come:
   ``commit_attempt`` checks that the attempt file is there with the size the record gives,
   renames it over the shard's name and fsyncs the directory, then records the shard (and its
   checksum) in the job file. Only the driver renames, so two attempts of a shard (a worker retried
   after it wrote, or a straggler) can never both land: the second record is discarded with
   its file (``discard_attempt``).
3. An attempt whose worker died leaves only its hidden file. The temporaries have the
   ``worker.atomic`` mark, so the next run's start (``jobstate.begin``), or this run's end,
   removes them (``remove_stale_temporaries``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa

from worker.atomic import TEMP_MARK, fsync_directory, fsync_file
from worker.errors import EngineError, OutputError
from worker.jobstate import JobState
from worker.sink import ShardWriter

CHECKSUM = "sha256"


@dataclass(frozen=True)
class ShardRecord:
    """What a worker hands back for a shard it wrote: all the driver needs to commit and count it."""

    shard: str  # the shard's file name, e.g. part-00000-00001.parquet
    attempt: str  # the attempt's id: its file is ``attempt_path(output, shard, attempt)``
    rows: int  # rows written (one per chunk with --chunking rows): what the job file records
    rows_read: int  # input rows
    error_rows: int
    truncated_rows: int
    tokens: int
    bytes: int  # size of the attempt's file
    checksum: str  # f"{CHECKSUM}:{hex digest}" of the file's bytes


RECORD_SCHEMA = pa.schema(
    [(item.name, pa.string() if item.type in ("str", str) else pa.int64()) for item in fields(ShardRecord)]
)


def records_to_table(records: list[ShardRecord]) -> pa.Table:
    """Records as an Arrow table (how they travel between Ray Data stages)."""
    return pa.Table.from_pylist([asdict(record) for record in records], schema=RECORD_SCHEMA)


def records_from_table(table: pa.Table) -> list[ShardRecord]:
    return [ShardRecord(**row) for row in table.to_pylist()]


def new_attempt() -> str:
    """An attempt id unique across processes and nodes (a pid is not: two nodes can share one)."""
    return uuid.uuid4().hex


def attempt_path(output: Path, shard: str, attempt: str) -> Path:
    return output / f".{shard}{TEMP_MARK}{attempt}"


class AttemptWriter:
    """Write one shard's windows into its attempt file; ``seal`` makes it durable and returns its record."""

    def __init__(self, output: Path, shard: str, attempt: str | None = None) -> None:
        self.output = output
        self.shard = shard
        self.attempt = attempt or new_attempt()
        self.path = attempt_path(output, shard, self.attempt)
        self._writer = ShardWriter(output, shard, temporary=self.path)

    @property
    def rows(self) -> int:
        return self._writer.rows

    def write(self, table: pa.Table) -> None:
        self._writer.write(table)

    def seal(self, rows_read: int, error_rows: int, truncated_rows: int, tokens: int) -> ShardRecord:
        """Close and fsync the attempt file (it stays hidden: only the driver renames it)."""
        try:
            self._writer.close()
            digest = _digest(self.path)
            fsync_file(self.path)
            size = self.path.stat().st_size
        except OSError as error:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing shard {self.shard}: {error}") from error
        return ShardRecord(self.shard, self.attempt, self.rows, rows_read, error_rows, truncated_rows, tokens, size, f"{CHECKSUM}:{digest}")

    def abort(self) -> None:
        self._writer.abort()


def _digest(path: Path) -> str:
    digest = hashlib.new(CHECKSUM)
    with open(path, "rb") as handle:  # just written: read back from the page cache
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_attempt(output: Path, record: ShardRecord) -> Path:
    """Rename a sealed attempt over its shard's name (replacing a shard that was not recorded) and fsync."""
    source = attempt_path(output, record.shard, record.attempt)
    final = output / record.shard
    try:
        size = source.stat().st_size
    except FileNotFoundError as error:
        raise OutputError(
            f"{source}: the attempt that wrote shard {record.shard} is not in the output directory; "
            "is --output on storage every node shares? Run again to resume"
        ) from error
    if size != record.bytes:
        raise OutputError(
            f"{source}: {size} bytes, but its worker wrote {record.bytes}; the output directory's storage "
            "does not show one node's writes to another whole. Run again to resume"
        )
    try:
        os.replace(source, final)
        fsync_directory(output)
    except OSError as error:
        raise OutputError(f"{final}: cannot commit shard: {error}") from error
    return final


def discard_attempt(output: Path, record: ShardRecord) -> None:
    """Remove a second attempt of a shard already committed."""
    attempt_path(output, record.shard, record.attempt).unlink(missing_ok=True)


def commit_shards(
    state: JobState, records: Iterable[ShardRecord], shards: Sequence[str], *, in_order: bool, admit: Callable[[ShardRecord], None]
) -> Iterator[ShardRecord]:
    """Commit the attempts ``records`` name and record each shard in the job file; yield each as it commits.

    ``shards`` are the shards this run writes, each expected once. Records commit as they come,
    or in the order of ``shards`` when ``in_order`` (records then wait, tiny, for the ones before
    them; their files wait on disk). ``admit`` is called before each commit and may raise to
    stop the job (``--max-errors``) with that shard uncommitted. A second record of a shard is
    discarded with its file; a record of a shard this run does not write, or a missing shard
    at the end, is an ``EngineError``.
    """
    expected = set(shards)
    waiting: dict[str, ShardRecord] = {}
    committed: set[str] = set()
    for record in records:
        if record.shard in committed or record.shard in waiting:
            discard_attempt(state.output, record)
            continue
        if record.shard not in expected:
            raise EngineError(f"a worker wrote shard {record.shard}, which this run does not write; run again to resume")
        waiting[record.shard] = record
        while waiting:
            name = (shards[len(committed)] if len(committed) < len(shards) else None) if in_order else next(iter(waiting))
            if name not in waiting:
                break
            ready = waiting.pop(name)
            admit(ready)
            commit_attempt(state.output, ready)
            state.record(ready.shard, ready.rows, ready.checksum)
            committed.add(ready.shard)
            yield ready
    if len(committed) != len(shards):
        raise EngineError(f"the workers finished {len(committed)} of {len(shards)} shards; run again to resume")
