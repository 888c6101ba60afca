"""Batching is pure: plans and padded arrays are checked against hand-computed ones and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batching import iter_padded_batches, plan_batches
from worker.modeldir.padding import pad_rows, padded_length


def padded_tokens(lengths: list[int], rows: np.ndarray, multiple_of: int) -> int:
    return len(rows) * padded_length(max(lengths[i] for i in rows), multiple_of)


def test_padded_length_rounds_up_to_the_multiple() -> None:
    assert [padded_length(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [1, 8, 8, 16, 16, 24]
    assert [padded_length(n, 1) for n in (0, 1, 5)] == [1, 1, 5]


def test_pad_rows_right_pads_ids_mask_and_type_ids() -> None:
    input_ids, attention_mask, token_type_ids = pad_rows(
        [[101, 7, 8, 102], [101, 9, 102, 10, 11, 102], [101, 102]],
        [[0, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0]],
        pad_id=0,
        multiple_of=4,
    )
    assert input_ids.tolist() == [
        [101, 7, 8, 102, 0, 0, 0, 0],
        [101, 9, 102, 10, 11, 102, 0, 0],
        [101, 102, 0, 0, 0, 0, 0, 0],
    ]
    assert attention_mask.tolist() == [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert token_type_ids.tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert input_ids.dtype == attention_mask.dtype == token_type_ids.dtype == np.int64


def test_pad_rows_single_segment_and_mismatched_type_ids() -> None:
    input_ids, attention_mask, token_type_ids = pad_rows([[101, 7, 102], [101, 102]], None, pad_id=5)
    assert input_ids.tolist() == [[101, 7, 102], [101, 102, 5]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert token_type_ids.tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="same length"):
        pad_rows([[101, 7, 102]], [[0, 0]], pad_id=0)


def test_pad_rows_uses_the_given_pad_id() -> None:
    input_ids, attention_mask, _ = pad_rows([[5, 6, 7], [5]], [[0, 0, 0], [0]], pad_id=3)
    assert input_ids.tolist() == [[5, 6, 7], [5, 3, 3]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_plan_batches_sorts_longest_first_and_cuts_by_rows() -> None:
    lengths = [3, 10, 1, 7, 5]
    batches = plan_batches(lengths, max_rows=2)
    assert [batch.tolist() for batch in batches] == [[1, 3], [4, 0], [2]]


def test_plan_batches_without_sorting_keeps_input_order() -> None:
    batches = plan_batches([3, 10, 1, 7, 5], max_rows=2, sort_by_length=False)
    assert [batch.tolist() for batch in batches] == [[0, 1], [2, 3], [4]]


def test_plan_batches_counts_padding_to_the_multiple_against_the_budget() -> None:
    # Lengths 9 pad to 16 with multiple_of=8: two rows cost 32 tokens, not 18.
    assert [b.tolist() for b in plan_batches([9, 9, 9], max_rows=10, max_tokens=31, multiple_of=8)] == [[0], [1], [2]]
    assert [b.tolist() for b in plan_batches([9, 9, 9], max_rows=10, max_tokens=32, multiple_of=8)] == [[0, 1], [2]]
    assert [b.tolist() for b in plan_batches([9, 9, 9], max_rows=10, max_tokens=27, multiple_of=1)] == [[0, 1, 2]]


def test_a_row_longer_than_the_budget_gets_a_batch_of_its_own() -> None:
    batches = plan_batches([4, 300, 4, 4], max_rows=8, max_tokens=64, multiple_of=8)
    assert [b.tolist() for b in batches] == [[1], [0, 2, 3]]


def test_plan_batches_of_nothing_is_empty_and_max_rows_must_be_positive() -> None:
    assert plan_batches([], max_rows=4) == []
    with pytest.raises(ValueError, match="max_rows"):
        plan_batches([1, 2], max_rows=0)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=80),
    max_rows=st.integers(min_value=1, max_value=40),
    max_tokens=st.one_of(st.none(), st.integers(min_value=1, max_value=4096)),
    multiple_of=st.sampled_from([1, 8, 64]),
    sort_by_length=st.booleans(),
)
def test_plan_batches_invariants(
    lengths: list[int], max_rows: int, max_tokens: int | None, multiple_of: int, sort_by_length: bool
) -> None:
    batches = plan_batches(lengths, max_rows, max_tokens, sort_by_length, multiple_of)
    placed = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    # Every row exactly once.
    assert sorted(placed.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_rows
        if max_tokens is not None and len(batch) > 1:
            assert padded_tokens(lengths, batch, multiple_of) <= max_tokens
    placed_lengths = [lengths[i] for i in placed]
    if sort_by_length:
        assert placed_lengths == sorted(lengths, reverse=True)
    else:
        assert placed.tolist() == list(range(len(lengths)))


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(min_value=1, max_value=30000), min_size=1, max_size=50), min_size=1, max_size=40),
    max_rows=st.integers(min_value=1, max_value=16),
    max_tokens=st.integers(min_value=8, max_value=512),
)
def test_iter_padded_batches_carries_every_row_back_to_its_index(
    rows: list[list[int]], max_rows: int, max_tokens: int
) -> None:
    type_ids = [[i % 2 for i in range(len(row))] for row in rows]
    seen: list[int] = []
    for batch in iter_padded_batches(rows, type_ids, pad_id=0, max_rows=max_rows, max_tokens=max_tokens, multiple_of=8):
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.token_type_ids.shape
        assert batch.input_ids.shape[0] == len(batch.rows) <= max_rows
        assert batch.input_ids.shape[1] % 8 == 0
        if len(batch.rows) > 1:
            assert batch.input_ids.size <= max_tokens
        assert int(batch.attention_mask.sum()) == sum(len(rows[i]) for i in batch.rows)
        for line, row in enumerate(batch.rows):
            length = len(rows[row])
            assert batch.input_ids[line, :length].tolist() == rows[row]
            assert batch.token_type_ids[line, :length].tolist() == type_ids[row]
            assert batch.attention_mask[line].tolist() == [1] * length + [0] * (batch.input_ids.shape[1] - length)
            assert not batch.input_ids[line, length:].any()
        seen.extend(batch.rows.tolist())
    assert sorted(seen) == list(range(len(rows)))
