"""Tokenizing text with the model directory's ``tokenizer.json`` (the Rust ``tokenizers`` library)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker.chunking import ChunkedWindow
from worker.entities import TokenOffsets
from worker.errors import ModelDirError, UsageError


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
    # token-classify only: the texts, character offsets and special-tokens masks entities are built
    # from; with --stride the units are a row's overlapping windows, mapped to rows by ``offsets``.
    offsets: TokenOffsets | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.token_ids), dtype=np.int64, count=len(self.token_ids))

    def row_of(self, unit: int) -> int:
        """The row a unit's results and errors belong to (with --stride, a row may have several units)."""
        return unit if self.offsets is None else self.offsets.row_of(unit)

    def row_token_ids(self) -> list[list[int]]:
        """Each row's tokens (its windows' tokens one after the other with --stride; overlaps count twice)."""
        if self.offsets is None or self.offsets.sequence_rows is None:
            return self.token_ids
        rows: list[list[int]] = [[] for _ in range(len(self.null))]
        for unit, ids in enumerate(self.token_ids):
            rows[self.offsets.row_of(unit)].extend(ids)
        return rows


def load_tokenizer(path: Path, max_length: int | None, stride: int = 0) -> Tokenizer:
    """Load ``tokenizer.json`` with truncation at ``max_length`` and no padding (batching pads).

    ``max_length=None``: no truncation (``--chunking`` cuts texts into chunks itself).
    ``stride``: overflowing windows of a long row overlap by this many tokens (token-classify's ``--stride``).
    """
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for bad files
        raise ModelDirError(f"{path}: cannot load tokenizer: {error}") from error
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
        return tokenizer
    room = max_length - tokenizer.num_special_tokens_to_add(is_pair=False)
    if stride and not 0 < stride < room:
        # tokenizers would only fail at the first encode, in the middle of a job.
        raise UsageError(f"--stride must be between 0 and {room - 1} (max length {max_length} less the special tokens), got {stride}")
    tokenizer.enable_truncation(max_length, stride=stride)
    return tokenizer


def tokenize_window(
    tokenizer: Tokenizer,
    texts: Sequence[str | None],
    pairs: Sequence[str | None] | None = None,
    with_offsets: bool = False,
    split_long_rows: bool = False,
) -> TokenizedRows:
    """Tokenize a window of texts (and optional second segments) in one parallel call.

    ``with_offsets`` keeps the character offsets (token-classify); ``split_long_rows`` turns each
    row's overflowing tokens into further units (the tokenizer's stride sets their overlap).
    """
    if with_offsets:
        return _tokenize_with_offsets(tokenizer, texts, split_long_rows)
    null = np.fromiter((text is None for text in texts), dtype=bool, count=len(texts))
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets the worker never reads:
    # the same ids, measured 5-13% faster on the benchmark's rows.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    if pairs is None:
        encodings = encode(_cut_for_truncation(tokenizer, texts))
    else:
        null |= np.fromiter((pair is None for pair in pairs), dtype=bool, count=len(pairs))
        encodings = encode([(text or "", pair or "") for text, pair in zip(texts, pairs)])
    return TokenizedRows(
        token_ids=[encoding.ids for encoding in encodings],
        type_ids=None if pairs is None else [encoding.type_ids for encoding in encodings],
        truncated=np.fromiter((bool(encoding.overflowing) for encoding in encodings), dtype=bool, count=len(encodings)),
        null=null,
    )


def _tokenize_with_offsets(tokenizer: Tokenizer, texts: Sequence[str | None], split_long_rows: bool) -> TokenizedRows:
    # encode_batch, not encode_batch_fast: the entities' character spans come from these offsets.
    # A prefix cut keeps the offsets into the whole text; a stride needs all of it.
    inputs = [text or "" for text in texts] if split_long_rows else _cut_for_truncation(tokenizer, texts)
    encodings = tokenizer.encode_batch(inputs)
    sequences = [[encoding, *encoding.overflowing] if split_long_rows else [encoding] for encoding in encodings]
    flat = [sequence for row in sequences for sequence in row]
    token_ids = [sequence.ids for sequence in flat]
    return TokenizedRows(
        token_ids=token_ids,
        type_ids=None,
        truncated=np.fromiter(
            (bool(encoding.overflowing) and not split_long_rows for encoding in encodings), dtype=bool, count=len(encodings)
        ),
        null=np.fromiter((text is None for text in texts), dtype=bool, count=len(texts)),
        offsets=TokenOffsets(
            texts=list(texts),
            token_ids=token_ids,
            offsets=[sequence.offsets for sequence in flat],
            special_tokens_mask=[sequence.special_tokens_mask for sequence in flat],
            sequence_rows=np.repeat(np.arange(len(sequences)), [len(row) for row in sequences]) if split_long_rows else None,
        ),
    )


# Truncation keeps the first max_length tokens, so a long text need not be tokenized whole (a 10 MB
# text took 0.55 GB): it is cut after PREFIX_CHARS_PER_TOKEN characters per kept token, back to a
# whitespace, and the prefix is used when it still overflows by MARGIN_TOKENS tokens. Tokenizers
# split words at whitespace before anything else, so the tokens before that whitespace are the full
# text's; the margin covers the last word's. A prefix that does not overflow (runs of spaces, one huge
# word) falls back to the whole text. Chunked runs, which read the whole text, never come here.
PREFIX_CHARS_PER_TOKEN = 32
MARGIN_TOKENS = 64


def _prefix_length(tokenizer: Tokenizer) -> int | None:
    truncation = tokenizer.truncation
    if truncation is None or tokenizer.pre_tokenizer is None:  # no word split: a cut could change any token
        return None
    return int(truncation["max_length"] + MARGIN_TOKENS) * PREFIX_CHARS_PER_TOKEN


def _cut_for_truncation(tokenizer: Tokenizer, texts: Sequence[str | None]) -> list[str]:
    """The texts to encode: long ones replaced by a prefix that truncates to the same tokens."""
    cut = _prefix_length(tokenizer)
    inputs = [text or "" for text in texts]
    if cut is None:
        return inputs
    prefixes: dict[int, str] = {}
    for row, text in enumerate(inputs):
        prefix = _prefix(text, cut) if len(text) > cut else None
        if prefix is not None:
            prefixes[row] = prefix
    if not prefixes:
        return inputs
    whole = _untruncated(tokenizer.to_str())
    lengths = [len(encoding.ids) for encoding in whole.encode_batch_fast(list(prefixes.values()))]
    needed = cut // PREFIX_CHARS_PER_TOKEN
    for (row, prefix), length in zip(prefixes.items(), lengths):
        if length >= needed:
            inputs[row] = prefix
    return inputs


def _prefix(text: str, cut: int) -> str | None:
    """``text`` up to its last whitespace within ``cut`` characters (None when there is none)."""
    for index in range(min(cut, len(text)) - 1, -1, -1):
        if text[index].isspace():
            return text[:index]
    return None


@functools.lru_cache(maxsize=4)
def _untruncated(serialized: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(serialized)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
