"""Tokenizing text with the model directory's ``tokenizer.json`` (the Rust ``tokenizers`` library)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker.chunking import ChunkedWindow
from worker.errors import ModelDirError


@dataclass(frozen=True)
class TokenizedRows:
    """Token ids of a window's units (its rows, or its rows' chunks). Null texts are tokenized as empty and flagged.

    ``type_ids`` is ``None`` for single-segment rows, whose segment ids are all 0
    (not copied out of the tokenizer: that costs as much as padding the batch).
    """

    token_ids: list[list[int]]
    type_ids: list[list[int]] | None
    truncated: np.ndarray  # bool per row
    null: np.ndarray  # bool per row
    # (#15 may cut over-long texts before tokenizing: such a row must be flagged ``truncated``
    # here too, as the ``truncated`` output column promises; chunking never cuts.)
    # With --chunking the units are chunks, and ``chunks`` maps them to the window's rows.
    chunks: ChunkedWindow | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.token_ids), dtype=np.int64, count=len(self.token_ids))


def load_tokenizer(path: Path, max_length: int | None) -> Tokenizer:
    """Load ``tokenizer.json`` with truncation at ``max_length`` and no padding (batching pads).

    ``max_length=None``: no truncation (``--chunking`` cuts texts into chunks itself).
    """
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for bad files
        raise ModelDirError(f"{path}: cannot load tokenizer: {error}") from error
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length)
    return tokenizer


def tokenize_window(
    tokenizer: Tokenizer, texts: Sequence[str | None], pairs: Sequence[str | None] | None = None
) -> TokenizedRows:
    """Tokenize a window of texts (and optional second segments) in one parallel call."""
    null = np.fromiter((text is None for text in texts), dtype=bool, count=len(texts))
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets the worker never reads:
    # the same ids, measured 5-13% faster on the benchmark's rows.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    if pairs is None:
        encodings = encode([text or "" for text in texts])
    else:
        null |= np.fromiter((pair is None for pair in pairs), dtype=bool, count=len(pairs))
        encodings = encode([(text or "", pair or "") for text, pair in zip(texts, pairs)])
    return TokenizedRows(
        token_ids=[encoding.ids for encoding in encodings],
        type_ids=None if pairs is None else [encoding.type_ids for encoding in encodings],
        truncated=np.fromiter((bool(encoding.overflowing) for encoding in encodings), dtype=bool, count=len(encodings)),
        null=null,
    )
