"""A window's output table from its units' results: one row per input row, or per chunk.

Columns, in order: the input columns (less the text unless ``--keep-text``), then
``chunk``, ``chunk_start``, ``chunk_end`` (``--chunking rows``), then ``num_tokens`` and
``truncated``, then the task's result columns, ``error`` last. Pure: no I/O, no model.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from worker.chunking import ChunkedWindow, mean_of_chunks
from worker.config import Chunking
from worker.embedding_format import EmbeddingFormat
from worker.tokenize import TokenizedRows

ROW_COLUMNS = ("num_tokens", "truncated")
CHUNK_COLUMNS = ("chunk", "chunk_start", "chunk_end")


def added_columns(chunking: Chunking) -> tuple[str, ...]:
    """The columns every output gets besides the task's results (for the clash check)."""
    return (CHUNK_COLUMNS if chunking == "rows" else ()) + ROW_COLUMNS


def row_vectors(
    pooled: np.ndarray, units: TokenizedRows, chunks: ChunkedWindow | None, chunking: Chunking, num_rows: int, fmt: EmbeddingFormat
) -> tuple[np.ndarray, np.ndarray]:
    """The float embeddings the output holds, one per output row, and which output rows are null.

    ``mean``: each row's chunks averaged (weighted by content tokens), then ``--dimensions``.
    """
    if chunking == "mean":
        assert chunks is not None
        null = np.zeros(num_rows, dtype=bool)
        np.logical_or.at(null, chunks.row, units.null)
        return fmt.float_vectors(mean_of_chunks(pooled, chunks.row, chunks.content_tokens, num_rows, fmt.normalize)), null
    return fmt.float_vectors(pooled), units.null


def assemble_table(
    table: pa.RecordBatch,
    unit_columns: dict[str, pa.Array],
    units: TokenizedRows,
    chunks: ChunkedWindow | None,
    chunking: Chunking,
    pooled: np.ndarray | None,
    fmt: EmbeddingFormat | None,
) -> pa.Table:
    """The output rows of a window. ``unit_columns`` are the task's result columns per unit (``error`` last)."""
    lengths = units.lengths
    if chunking == "mean":
        assert chunks is not None and pooled is not None and fmt is not None
        vectors, null = row_vectors(pooled, units, chunks, chunking, table.num_rows, fmt)
        errors: list[str | None] = [None] * table.num_rows
        for row, note in zip(chunks.row.tolist(), unit_columns["error"].to_pylist()):
            if note is not None and errors[row] is None:
                errors[row] = note  # a row fails with the first of its chunks that failed
        tokens = np.bincount(chunks.row, weights=lengths, minlength=table.num_rows).astype(np.int32)
        columns = {
            "num_tokens": pa.array(tokens, mask=null),
            "truncated": pa.array(np.zeros(table.num_rows, dtype=bool), mask=null),
            "embedding": fmt.column(vectors, null),
            "error": pa.array(errors, pa.string()),
        }
        return _with_columns(table, columns)
    null = units.null
    columns = {}
    if chunking == "rows":
        assert chunks is not None
        table = table.take(pa.array(chunks.row))
        columns.update(chunk=pa.array(chunks.chunk, mask=null), chunk_start=pa.array(chunks.start, mask=null), chunk_end=pa.array(chunks.end, mask=null))
    columns["num_tokens"] = pa.array(lengths.astype(np.int32), mask=null)
    columns["truncated"] = pa.array(units.truncated, mask=null)
    columns.update(unit_columns)
    if fmt is not None and pooled is not None:
        vectors, _ = row_vectors(pooled, units, chunks, chunking, len(lengths), fmt)
        columns["embedding"] = fmt.column(vectors, null)
    return _with_columns(table, columns)


def _with_columns(table: pa.RecordBatch, columns: dict[str, pa.Array]) -> pa.Table:
    for name, values in columns.items():
        table = table.append_column(name, values)
    return pa.Table.from_batches([table])
