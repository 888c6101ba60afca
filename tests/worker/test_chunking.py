"""Chunk planning and the weighted mean of chunk embeddings (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.chunking import Template, chunk_length, chunk_spans, chunk_window, mean_of_chunks

BERT = Template(prefix=(101,), suffix=(102,))


def test_chunk_length_leaves_room_for_special_and_prompt_tokens() -> None:
    assert chunk_length(128, BERT) == 126
    assert chunk_length(128, BERT, prompt_tokens=3) == 123
    with pytest.raises(ValueError, match="no room"):
        chunk_length(4, BERT, prompt_tokens=2)


@pytest.mark.parametrize(
    ("tokens", "length", "overlap", "expected"),
    [
        (0, 4, 1, [(0, 0)]),
        (1, 4, 1, [(0, 1)]),
        (4, 4, 1, [(0, 4)]),  # exactly the maximum: one chunk
        (5, 4, 0, [(0, 4), (4, 5)]),  # one token over
        (5, 4, 3, [(0, 4), (1, 5)]),  # overlap = chunk - 1
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (11, 4, 1, [(0, 4), (3, 7), (6, 10), (9, 11)]),
    ],
)
def test_spans(tokens: int, length: int, overlap: int, expected: list[tuple[int, int]]) -> None:
    assert chunk_spans(tokens, length, overlap) == expected


@pytest.mark.parametrize("overlap", [0, 1, 7, 8 - 1])
def test_spans_cover_every_token_and_overlap_as_asked(overlap: int) -> None:
    length = 8
    for tokens in range(0, 60):
        spans = chunk_spans(tokens, length, overlap)
        covered = set().union(*(range(a, b) for a, b in spans))
        assert covered == set(range(tokens))
        assert all(0 < b - a <= length for a, b in spans if tokens)
        assert all(b1 - a2 == overlap for (_, b1), (a2, _) in zip(spans, spans[1:]))
        assert spans[-1][1] == tokens


def test_overlap_must_be_smaller_than_the_chunk() -> None:
    with pytest.raises(ValueError, match="smaller than the chunk"):
        chunk_spans(10, 4, 4)
    with pytest.raises(ValueError, match="at least 0"):
        chunk_spans(10, 4, -1)


def test_window_frames_each_chunk_as_a_row_and_maps_offsets() -> None:
    # row 0: 5 tokens with offsets; row 1: null; row 2: empty text; row 3: one token
    ids = [[1, 2, 3, 4, 5], [], [], [9]]
    offsets = [[(0, 3), (4, 6), (6, 9), (10, 12), (13, 20)], [], [], [(0, 2)]]
    null = np.array([False, True, False, False])
    window = chunk_window(ids, offsets, null, BERT, max_length=5, overlap=1, prompt_ids=(7,))
    # chunk length 5 - 2 - 1 = 2, step 1
    assert window.token_ids == [
        [101, 7, 1, 2, 102], [101, 7, 2, 3, 102], [101, 7, 3, 4, 102], [101, 7, 4, 5, 102],
        [101, 7, 102],
        [101, 7, 102],
        [101, 7, 9, 102],
    ]  # fmt: skip
    assert window.row.tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert window.chunk.tolist() == [0, 1, 2, 3, 0, 0, 0]
    assert window.start.tolist() == [0, 4, 6, 10, 0, 0, 0]
    assert window.end.tolist() == [6, 9, 12, 20, 0, 0, 2]
    assert window.content_tokens.tolist() == [2, 2, 2, 2, 0, 0, 1]
    assert window.null.tolist() == [False] * 4 + [True, False, False]
    assert window.lengths.max() == 5


def test_offsets_shift_by_the_prompt() -> None:
    window = chunk_window([[1, 2]], [[(8, 10), (11, 14)]], np.array([False]), BERT, 10, 0, prompt_ids=(7,), offset_shift=8)
    assert (window.start.tolist(), window.end.tolist()) == ([0], [6])


def test_mean_weights_chunks_by_content_tokens() -> None:
    vectors = np.array([[1, 0], [0, 1], [3, 4], [1, 1]], np.float32)
    row = np.array([0, 0, 1, 2])
    weights = np.array([3, 1, 5, 0])
    means = mean_of_chunks(vectors, row, weights, 3, normalize=False)
    np.testing.assert_allclose(means[0], [0.75, 0.25])
    assert np.array_equal(means[1:], vectors[2:])  # a single chunk passes through unchanged, even unnormalised
    normed = mean_of_chunks(vectors, row, weights, 3, normalize=True)
    np.testing.assert_allclose(normed[0], np.array([0.75, 0.25]) / np.hypot(0.75, 0.25), rtol=1e-6)
    assert np.array_equal(normed[1:], vectors[2:])
