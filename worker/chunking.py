"""Chunking long texts: cutting a row's tokens into model-sized pieces, and averaging them back.

A row's content tokens (its tokens without the special tokens the tokenizer's template
adds) are cut into chunks of at most ``max_length`` minus the template's special tokens
minus the prompt's tokens; consecutive chunks share ``overlap`` tokens. Each chunk is
framed as a row of its own would be: ``prefix`` (e.g. ``[CLS]``), the prompt's tokens,
the chunk's content tokens, ``suffix`` (e.g. ``[SEP]``). A row that fits in one chunk
gets exactly the tokens it gets without chunking. Pure logic, no I/O: the caller
tokenizes (without truncation, with character offsets) and runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.matryoshka import l2_normalize


@dataclass(frozen=True)
class Template:
    """The special tokens a tokenizer puts around one segment (BERT: ``[CLS]`` ... ``[SEP]``)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.suffix)


def chunk_length(max_length: int, template: Template, prompt_tokens: int = 0) -> int:
    """Content tokens per chunk: what is left of ``max_length`` after the special and prompt tokens."""
    length = max_length - template.special_tokens - prompt_tokens
    if length < 1:
        raise ValueError(
            f"no room for text in a chunk: max length {max_length} minus {template.special_tokens} special "
            f"and {prompt_tokens} prompt tokens leaves {length}"
        )
    return length


def chunk_spans(num_tokens: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` token spans of the chunks of ``num_tokens`` content tokens (one span when they fit)."""
    if not 0 <= overlap < length:
        raise ValueError(f"the chunk overlap must be at least 0 and smaller than the chunk ({length} tokens), got {overlap}")
    if num_tokens <= length:
        return [(0, num_tokens)]
    step = length - overlap
    spans = []
    start = 0
    while True:
        end = min(start + length, num_tokens)
        spans.append((start, end))
        if end == num_tokens:
            return spans
        start += step


@dataclass(frozen=True)
class ChunkedWindow:
    """A window's rows cut into chunks: the units that are batched and run, one entry per chunk.

    A null row is one chunk of the template alone (as an empty text), flagged ``null``.
    """

    token_ids: list[list[int]]
    row: np.ndarray  # int64: the window row each chunk belongs to, rows in order, chunks in order
    chunk: np.ndarray  # int32: the chunk's index within its row, from 0
    start: np.ndarray  # int32: character offset of the chunk's first content token in the row's text
    end: np.ndarray  # int32: character offset just past the chunk's last content token
    content_tokens: np.ndarray  # int64: content tokens per chunk (the weight of its embedding)
    null: np.ndarray  # bool per chunk

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.token_ids), dtype=np.int64, count=len(self.token_ids))


def chunk_window(
    content_ids: Sequence[Sequence[int]],
    content_offsets: Sequence[Sequence[tuple[int, int]]],
    null: np.ndarray,
    template: Template,
    max_length: int,
    overlap: int,
    prompt_ids: Sequence[int] = (),
    offset_shift: int = 0,
) -> ChunkedWindow:
    """Cut each row's content tokens into chunks framed by ``template`` (and ``prompt_ids``).

    ``content_ids``/``content_offsets`` are per row, without special or prompt tokens;
    offsets are character ``(start, end)`` pairs, moved by ``-offset_shift`` (the prompt's
    length, when the prompt was tokenized as part of the text) and clipped at 0.
    """
    length = chunk_length(max_length, template, len(prompt_ids))
    head = [*template.prefix, *prompt_ids]
    tail = list(template.suffix)
    token_ids: list[list[int]] = []
    row: list[int] = []
    chunk: list[int] = []
    start: list[int] = []
    end: list[int] = []
    weight: list[int] = []
    null_chunk: list[bool] = []
    for index, (ids, offsets) in enumerate(zip(content_ids, content_offsets)):
        spans = [(0, 0)] if null[index] else chunk_spans(len(ids), length, overlap)
        for position, (first, last) in enumerate(spans):
            token_ids.append([*head, *ids[first:last], *tail])
            row.append(index)
            chunk.append(position)
            start.append(max(0, offsets[first][0] - offset_shift) if last > first else 0)
            end.append(max(0, offsets[last - 1][1] - offset_shift) if last > first else 0)
            weight.append(last - first)
            null_chunk.append(bool(null[index]))
    return ChunkedWindow(
        token_ids=token_ids,
        row=np.asarray(row, dtype=np.int64),
        chunk=np.asarray(chunk, dtype=np.int32),
        start=np.asarray(start, dtype=np.int32),
        end=np.asarray(end, dtype=np.int32),
        content_tokens=np.asarray(weight, dtype=np.int64),
        null=np.asarray(null_chunk, dtype=bool),
    )


def mean_of_chunks(
    vectors: np.ndarray, row: np.ndarray, weights: np.ndarray, num_rows: int, normalize: bool
) -> np.ndarray:
    """Each row's embedding: the mean of its chunks' vectors weighted by their content tokens.

    L2-normalised again when ``normalize`` (the export normalises). A row of one chunk (an
    empty text included) gets that chunk's vector unchanged; a row of several chunks has
    content tokens in each. ``row`` must cover every row in ``range(num_rows)``.
    """
    counts = np.bincount(row, minlength=num_rows)
    result = np.zeros((num_rows, vectors.shape[1]), dtype=np.float32)
    single = counts == 1
    single_chunks = np.flatnonzero(single[row])
    result[row[single_chunks]] = vectors[single_chunks]
    several = np.flatnonzero(~single[row])
    if len(several):
        chunk_rows = row[several]
        chunk_weights = weights[several].astype(np.float64)
        totals = np.bincount(chunk_rows, weights=chunk_weights, minlength=num_rows)
        sums = np.zeros((num_rows, vectors.shape[1]), dtype=np.float64)
        np.add.at(sums, chunk_rows, vectors[several].astype(np.float64) * chunk_weights[:, None])
        rows = np.unique(chunk_rows)
        means = (sums[rows] / totals[rows, None]).astype(np.float32)
        result[rows] = l2_normalize(means) if normalize else means
    return result
