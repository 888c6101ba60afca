"""A shard's tokenized windows as one Arrow row: what the Ray engine moves from its tokenizing tasks
to its writing actors.

Only what tokenizing produced travels: token ids (int32), segment ids when there are text pairs
(int8), the truncated and null flags, notes for text that is not UTF-8, and the rows of each
window. That is a few bytes per token however wide the rows are; the writing actor reads the
rows themselves again from the input, window by window, where it writes them. Arrow buffers
throughout (Ray Data blocks, zero-copy between processes of a node), no pickled Python objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa

from worker.chunking import ChunkedWindow
from worker.tokenize import TokenizedRows

SCHEMA = pa.schema(
    [
        ("position", pa.int64()),  # the shard's index in the run's list of pending shards
        ("window_rows", pa.list_(pa.int64())),  # input rows of each window
        ("window_units", pa.list_(pa.int64())),  # model units of each window: its rows, or their chunks
        ("token_ids", pa.list_(pa.large_list(pa.int32()))),  # one list per unit of the shard, windows one after the other
        ("type_ids", pa.list_(pa.large_list(pa.int8()))),  # null for single-segment rows (all zeros)
        ("truncated", pa.list_(pa.bool_())),
        ("null", pa.list_(pa.bool_())),
        ("unreadable_rows", pa.list_(pa.int64())),  # units of the shard whose text is not UTF-8 ...
        ("unreadable_notes", pa.list_(pa.string())),  # ... and why
    ]
    # With --chunking, each unit's chunk (``worker.chunking.ChunkedWindow``); null otherwise.
    + [(f"chunk_{name}", pa.list_(kind)) for name, kind in (
        ("row", pa.int64()), ("chunk", pa.int32()), ("start", pa.int32()), ("end", pa.int32()),
        ("content_tokens", pa.int64()), ("null", pa.bool_()),
    )]  # fmt: skip
)
CHUNK_FIELDS = ("row", "chunk", "start", "end", "content_tokens", "null")


@dataclass(frozen=True)
class WindowTokens:
    """One window's tokens, its unreadable units (unit in the window -> note) and its input rows."""

    tokens: TokenizedRows
    unreadable: dict[int, str]
    rows: int


def shard_to_arrow(position: int, windows: Sequence[WindowTokens]) -> pa.Table:
    """A one-row table holding all of a shard's tokenized windows."""
    token_ids = list(chain.from_iterable(window.tokens.token_ids for window in windows))
    pairs = bool(windows) and windows[0].tokens.type_ids is not None
    type_ids = list(chain.from_iterable(window.tokens.type_ids or [] for window in windows)) if pairs else None
    starts = np.cumsum([0] + [len(window.tokens.token_ids) for window in windows])
    unreadable = [(int(start) + row, note) for window, start in zip(windows, starts) for row, note in window.unreadable.items()]
    chunked = bool(windows) and windows[0].tokens.chunks is not None
    chunk_columns = [
        _one_row(pa.array(np.concatenate([getattr(w.tokens.chunks, name) for w in windows]), SCHEMA.field(f"chunk_{name}").type.value_type))
        if chunked else pa.nulls(1, SCHEMA.field(f"chunk_{name}").type)
        for name in CHUNK_FIELDS
    ]  # fmt: skip
    return pa.Table.from_arrays(
        [
            pa.array([position], pa.int64()),
            pa.array([[window.rows for window in windows]], pa.list_(pa.int64())),
            pa.array([[len(window.tokens.token_ids) for window in windows]], pa.list_(pa.int64())),
            _one_row(_ragged(token_ids, np.int32)),
            _one_row(_ragged(type_ids, np.int8)) if type_ids is not None else pa.nulls(1, SCHEMA.field("type_ids").type),
            _one_row(pa.array(np.concatenate([w.tokens.truncated for w in windows]) if windows else [], pa.bool_())),
            _one_row(pa.array(np.concatenate([w.tokens.null for w in windows]) if windows else [], pa.bool_())),
            pa.array([[row for row, _ in unreadable]], pa.list_(pa.int64())),
            pa.array([[note for _, note in unreadable]], pa.list_(pa.string())),
            *chunk_columns,
        ],
        schema=SCHEMA,
    )


def shard_from_arrow(table: pa.Table) -> tuple[int, list[int], Iterator[WindowTokens]]:
    """``(position, rows of each window, the windows)`` of a ``shard_to_arrow`` row.

    The windows are decoded one at a time, as they are consumed: only the Arrow buffers and
    one window's Python lists are held at once.
    """
    if table.num_rows != 1:
        raise ValueError(f"a tokenized shard is one row, got {table.num_rows}")
    row = {name: table.column(name).chunk(0) if table.column(name).num_chunks == 1 else table.column(name).combine_chunks() for name in SCHEMA.names}
    position = int(row["position"][0].as_py())
    window_rows = row["window_rows"][0].as_py()
    return position, window_rows, _windows(row, window_rows, row["window_units"][0].as_py())


def _windows(row: dict[str, pa.Array], window_rows: list[int], window_units: list[int]) -> Iterator[WindowTokens]:
    token_ids = row["token_ids"][0].values
    type_ids = None if row["type_ids"].null_count else row["type_ids"][0].values
    truncated = row["truncated"][0].values.to_numpy(zero_copy_only=False)
    null = row["null"][0].values.to_numpy(zero_copy_only=False)
    unreadable = dict(zip(row["unreadable_rows"][0].as_py(), row["unreadable_notes"][0].as_py()))
    chunks = None if row["chunk_row"].null_count else {
        name: row[f"chunk_{name}"][0].values.to_numpy(zero_copy_only=False) for name in CHUNK_FIELDS
    }  # fmt: skip
    start = 0
    for rows, count in zip(window_rows, window_units):
        stop = start + count
        ids = token_ids.slice(start, count).to_pylist()
        window_chunks = None if chunks is None else ChunkedWindow(ids, **{name: values[start:stop].copy() for name, values in chunks.items()})
        tokens = TokenizedRows(
            token_ids=ids,
            type_ids=None if type_ids is None else type_ids.slice(start, count).to_pylist(),
            truncated=truncated[start:stop].copy(),
            null=null[start:stop].copy(),
            chunks=window_chunks,
        )
        yield WindowTokens(tokens, {unit - start: note for unit, note in unreadable.items() if start <= unit < stop}, rows)
        start = stop


def _ragged(rows: list[list[int]], dtype: type[np.generic]) -> pa.LargeListArray:
    # 64-bit offsets: a shard of many long rows may hold more than 2**31 tokens.
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)), out=offsets[1:])
    values = np.fromiter(chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _one_row(values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
