"""Padding rows into model inputs: the one implementation the worker runs and the exporter validates.

An export is traced and validated on batches padded exactly as the worker pads
them (right padding, ``attention_mask`` of real tokens, ``token_type_ids`` zero on
padding), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np


def padded_length(longest: int, multiple_of: int) -> int:
    """Round up to a multiple (kernels run faster on multiples of 8)."""
    return max(1, -(-longest // multiple_of) * multiple_of)


def pad_rows(
    token_ids: Sequence[Sequence[int]],
    type_ids: Sequence[Sequence[int]] | None,
    pad_id: int,
    multiple_of: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad rows into ``(input_ids, attention_mask, token_type_ids)`` int64 arrays.

    ``type_ids`` has one entry per token, as the tokenizer gives it, or is ``None`` for
    single-segment rows (all zeros). Rows are filled in one vectorised step (no per-row
    Python work): padding runs in the thread that feeds the device.
    """
    lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
    if type_ids is not None and not np.array_equal(lengths, np.fromiter(map(len, type_ids), dtype=np.int64, count=len(type_ids))):
        raise ValueError("token_ids and type_ids must have the same length in every row")
    width = padded_length(int(lengths.max(initial=1)), multiple_of)
    valid = np.arange(width) < lengths[:, None]
    tokens = int(lengths.sum())
    input_ids = np.full((len(token_ids), width), pad_id, dtype=np.int64)
    input_ids[valid] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=tokens)
    token_type_ids = np.zeros((len(token_ids), width), dtype=np.int64)
    if type_ids is not None:
        token_type_ids[valid] = np.fromiter(chain.from_iterable(type_ids), dtype=np.int64, count=tokens)
    return input_ids, valid.astype(np.int64), token_type_ids
