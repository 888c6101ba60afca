"""A shard's tokens as one Arrow row (``worker.shard_tokens``): the round trip is exact, without Ray or a model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from worker.chunking import ChunkedWindow
from worker.shard_tokens import CHUNK_FIELDS, SCHEMA, WindowTokens, shard_from_arrow, shard_to_arrow
from worker.tokenize import TokenizedRows


def window(rows: list[list[int]], pairs: bool, unreadable: dict[int, str] | None = None, truncated_row: int = -1) -> WindowTokens:
    tokens = TokenizedRows(
        token_ids=rows,
        type_ids=[[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in rows] if pairs else None,
        truncated=np.array([i == truncated_row for i in range(len(rows))]),
        null=np.array([not r for r in rows]),
    )
    return WindowTokens(tokens, unreadable or {}, rows=len(rows))


def assert_same(got: WindowTokens, expected: WindowTokens) -> None:
    assert got.tokens.token_ids == expected.tokens.token_ids
    assert got.tokens.type_ids == expected.tokens.type_ids
    assert got.tokens.truncated.tolist() == expected.tokens.truncated.tolist()
    assert got.tokens.null.tolist() == expected.tokens.null.tolist()
    assert got.unreadable == expected.unreadable
    assert got.rows == expected.rows
    assert (got.tokens.chunks is None) == (expected.tokens.chunks is None)
    if expected.tokens.chunks is not None:
        assert got.tokens.chunks is not None and got.tokens.chunks.token_ids == expected.tokens.chunks.token_ids
        for name in CHUNK_FIELDS:
            assert getattr(got.tokens.chunks, name).tolist() == getattr(expected.tokens.chunks, name).tolist(), name


@pytest.mark.parametrize("pairs", [False, True])
def test_a_shard_of_windows_round_trips_exactly(pairs: bool) -> None:
    windows = [
        window([[101, 7592, 102], [], [101, 30521, 2088, 102]], pairs, unreadable={1: "invalid UTF-8 in column 'text'"}, truncated_row=2),
        window([[101, 102]], pairs),
        window([[101, 2, 3, 4, 5, 102], [101, 102], []], pairs, unreadable={2: "invalid UTF-8 in column 'pair'"}),
    ]
    table = shard_to_arrow(17, windows)
    assert table.schema == SCHEMA and table.num_rows == 1
    position, window_rows, decoded = shard_from_arrow(table)
    assert (position, window_rows) == (17, [3, 1, 3])
    got = list(decoded)
    assert len(got) == 3
    for a, b in zip(got, windows):
        assert_same(a, b)


def chunked(rows_chunks: list[int], unreadable: dict[int, str] | None = None) -> WindowTokens:
    """A window of ``len(rows_chunks)`` rows cut into that many chunks each (--chunking)."""
    row = np.repeat(np.arange(len(rows_chunks)), rows_chunks)
    chunk = np.concatenate([np.arange(n) for n in rows_chunks]).astype(np.int32)
    ids = [[101, 1000 + i, 102] for i in range(len(row))]
    chunks = ChunkedWindow(
        ids, row=row, chunk=chunk, start=(chunk * 7).astype(np.int32), end=(chunk * 7 + 5).astype(np.int32),
        content_tokens=np.ones(len(row), np.int64), null=np.zeros(len(row), bool),
    )  # fmt: skip
    tokens = TokenizedRows(ids, None, np.zeros(len(row), bool), chunks.null, chunks)
    return WindowTokens(tokens, unreadable or {}, rows=len(rows_chunks))


def test_chunked_windows_round_trip_with_their_units_and_rows() -> None:
    windows = [chunked([1, 3, 2], unreadable={4: "invalid UTF-8 in column 'text'"}), chunked([2, 1])]
    position, window_rows, decoded = shard_from_arrow(shard_to_arrow(3, windows))
    assert (position, window_rows) == (3, [3, 2])
    for got, expected in zip(decoded, windows, strict=True):
        assert_same(got, expected)


def test_tokens_survive_an_ipc_round_trip_as_a_ray_block_does() -> None:
    windows = [window([[101, 1, 102]] * 5, pairs=False)]
    sink = pa.BufferOutputStream()
    table = shard_to_arrow(0, windows)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    again = pa.ipc.open_stream(sink.getvalue()).read_all()
    _, _, decoded = shard_from_arrow(again)
    assert_same(next(decoded), windows[0])


def test_the_row_costs_bytes_per_token_not_per_row_width() -> None:
    rows = [[101] + [2000 + i % 50 for i in range(30)] + [102]] * 1000
    table = shard_to_arrow(0, [window(rows, pairs=False)])
    tokens = sum(len(r) for r in rows)
    assert table.nbytes < 4 * tokens + 16 * len(rows) + 1024  # int32 ids, 64-bit offsets, flags


def test_more_than_one_row_is_refused() -> None:
    table = shard_to_arrow(0, [window([[101, 102]], pairs=False)])
    with pytest.raises(ValueError, match="one row"):
        shard_from_arrow(pa.concat_tables([table, table]))
