"""Batching: which rows go together, padded into arrays (``worker/modeldir/padding.py``). Pure logic, no I/O.

Rows are sorted by token length inside a window so a batch holds rows of similar
length (little padding), and batches are cut by a row count and a token budget.
The caller restores the original order with the row indices each batch carries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from worker.modeldir.padding import pad_rows, padded_length


@dataclass(frozen=True)
class PaddedBatch:
    """Model inputs for a set of rows, right-padded to a common length."""

    rows: np.ndarray  # indices into the window the rows came from
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    # The tokens mean pooling averages, for exports with a ``pooling_mask`` input (the
    # attention mask less the prompt's tokens); ``None``: the attention mask.
    pooling_mask: np.ndarray | None = None


def with_pooling_skip(batch: PaddedBatch, skip: int | None) -> PaddedBatch:
    """The batch with a pooling mask that leaves each row's first ``skip`` positions out (``None``: none)."""
    if skip is None:
        return batch
    pooling_mask = batch.attention_mask.copy()
    pooling_mask[:, :skip] = 0
    return PaddedBatch(batch.rows, batch.input_ids, batch.attention_mask, batch.token_type_ids, pooling_mask)


def plan_batches(
    lengths: Sequence[int],
    max_rows: int,
    max_tokens: int | None = None,
    sort_by_length: bool = True,
    multiple_of: int = 8,
) -> list[np.ndarray]:
    """Group row indices into batches.

    A batch holds at most ``max_rows`` rows and, when ``max_tokens`` is set, at most
    that many padded tokens (rows x padded length). Sorting by length first keeps
    padding low; a single row longer than the budget still gets a batch of its own.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    lengths_array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths_array, kind="stable") if sort_by_length else np.arange(len(lengths_array))
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start + 1
        longest = lengths_array[order[start]]
        while end < len(order) and end - start < max_rows:
            candidate_longest = max(longest, lengths_array[order[end]])
            if max_tokens is not None and (end - start + 1) * padded_length(int(candidate_longest), multiple_of) > max_tokens:
                break
            longest = candidate_longest
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def iter_padded_batches(
    token_ids: Sequence[Sequence[int]],
    type_ids: Sequence[Sequence[int]] | None,
    pad_id: int,
    max_rows: int,
    max_tokens: int | None = None,
    sort_by_length: bool = True,
    multiple_of: int = 8,
) -> Iterator[PaddedBatch]:
    """Plan batches over a window of tokenized rows and pad each one."""
    lengths = [len(row) for row in token_ids]
    for rows in plan_batches(lengths, max_rows, max_tokens, sort_by_length, multiple_of):
        row_types = None if type_ids is None else [type_ids[i] for i in rows]
        arrays = pad_rows([token_ids[i] for i in rows], row_types, pad_id, multiple_of)
        yield PaddedBatch(rows, *arrays)
