"""Reading Parquet input: resolve files, check their schemas up front, stream record batches.

Every file's footer is read before any output is written, so a missing column
or a corrupt file fails the job before it starts. Shards (units of work) are
runs of whole row groups, so a resumed job skips finished ones without reading them.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from worker.errors import InputError, InputSchemaError

_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view()) if hasattr(pa, "string_view") else (pa.string(), pa.large_string())


def _is_text_type(data_type: pa.DataType) -> bool:
    # A column of nulls only (pandas writes all-None object columns so) is text whose rows are all null;
    # dictionary-encoded strings (pandas categoricals) are strings too.
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    return pa.types.is_null(data_type) or any(data_type == t for t in _STRING_TYPES)


@dataclass(frozen=True)
class InputFile:
    path: Path
    size: int
    mtime_ns: int
    num_rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Shard:
    """A unit of work: consecutive row groups of one input file."""

    file_index: int
    shard_index: int
    row_groups: tuple[int, ...]
    num_rows: int

    @property
    def name(self) -> str:
        return f"part-{self.file_index:05d}-{self.shard_index:05d}.parquet"


def resolve_inputs(pattern: str) -> list[Path]:
    """A file, a directory (its ``*.parquet`` files, recursively) or a glob, in sorted order."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise InputError(f"{pattern}: directory has no *.parquet files")
        return files
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{pattern}: no file matches this pattern")
        return files
    raise InputError(f"{pattern}: no such file or directory")


def inspect_inputs(
    paths: list[Path], text_column: str, text_pair_column: str | None, id_column: str | None
) -> list[InputFile]:
    """Read every footer and check the columns; raise naming the file and column."""
    files = []
    for path in paths:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{path}: cannot read as Parquet: {error}") from error
        schema = parquet.schema_arrow
        for column, role in ((text_column, "--text-column"), (text_pair_column, "--text-pair-column"), (id_column, "--id-column")):
            if column is None:
                continue
            if column not in schema.names:
                raise InputSchemaError(
                    f"{path}: no column {column!r} ({role}); columns are {', '.join(schema.names) or 'none'}"
                )
            if schema.names.count(column) > 1:
                raise InputSchemaError(
                    f"{path}: column {column!r} ({role}) appears {schema.names.count(column)} times; give the columns distinct names"
                )
            if role != "--id-column" and not _is_text_type(schema.field(column).type):
                raise InputSchemaError(
                    f"{path}: column {column!r} ({role}) has type {schema.field(column).type}, expected a string column"
                )
        metadata = parquet.metadata
        stat = path.stat()
        files.append(
            InputFile(
                path=path,
                size=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
                num_rows=metadata.num_rows,
                row_group_rows=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
                columns=tuple(schema.names),
            )
        )
    return files


def plan_shards(files: list[InputFile], rows_per_shard: int) -> list[Shard]:
    """Cut each file into shards of whole row groups, about ``rows_per_shard`` rows each."""
    shards = []
    for file_index, input_file in enumerate(files):
        groups: list[int] = []
        rows = 0
        shard_index = 0
        for group, group_rows in enumerate(input_file.row_group_rows):
            groups.append(group)
            rows += group_rows
            if rows >= rows_per_shard:
                shards.append(Shard(file_index, shard_index, tuple(groups), rows))
                shard_index, groups, rows = shard_index + 1, [], 0
        if rows:  # zero-row files and trailing zero-row groups need no shard: there is nothing to write
            shards.append(Shard(file_index, shard_index, tuple(groups), rows))
    return shards


def column_texts(column: pa.Array) -> tuple[list[str | None], list[int]]:
    """A text column's values as Python strings, and the rows that are not valid UTF-8 (returned as None)."""
    try:
        return column.to_pylist(), []
    except UnicodeDecodeError:
        pass
    # Parquet writers need not check UTF-8: decode row by row, so one bad row does not sink its file.
    texts: list[str | None] = []
    invalid: list[int] = []
    for row, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            texts.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
            invalid.append(row)
    return texts, invalid


# A window's rows are bounded by bytes as well as by count: rows of megabytes of text come a few at
# a time (the row groups' uncompressed size per row tells how big the shard's rows are on average).
WINDOW_BYTES = 64 * 1024 * 1024


def read_shard(
    input_file: InputFile, shard: Shard, batch_rows: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a shard's rows (all columns, or only ``columns``) as record batches of at most ``batch_rows``
    rows and about ``WINDOW_BYTES``. The windows do not depend on ``columns``: the size is the whole row's."""
    try:
        parquet = pq.ParquetFile(input_file.path)
        groups = [parquet.metadata.row_group(group) for group in shard.row_groups]
        rows, size = sum(group.num_rows for group in groups), sum(group.total_byte_size for group in groups)
        if rows and size > WINDOW_BYTES:
            batch_rows = max(1, min(batch_rows, WINDOW_BYTES * rows // size))
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=list(shard.row_groups), columns=columns):
            if batch.num_rows:
                yield batch
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{input_file.path}: read failed in row groups {shard.row_groups}: {error}") from error
