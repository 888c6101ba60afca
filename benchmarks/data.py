"""Benchmark data: generated texts with a known token-length mix, written to Parquet.

Texts are random sequences of plain lowercase whole words taken from the BERT
vocabulary itself (no ``##`` pieces), so a text of ``n`` words tokenizes to exactly
``n + 2`` tokens ([CLS] and [SEP]) and the length distribution is under control.
The mix is log-normal with mean ~82 tokens and p99 ~381, capped at 512: many short
rows and a long tail, as in real corpora. A second set has every row at 128 tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TEXT_COLUMN = "text"
ID_COLUMN = "id"
MIXED_MEAN_TOKENS = 82.0
MIXED_P99_TOKENS = 381.0
MAX_TOKENS_PER_ROW = 512
MIN_TOKENS_PER_ROW = 3  # [CLS] word [SEP]
FIXED_TOKENS_PER_ROW = 128
SPECIAL_TOKENS_PER_ROW = 2
# Upper edges (inclusive) of the length buckets the plot is drawn over.
BUCKET_EDGES = (16, 32, 64, 128, 256, 512)
_WORD = re.compile(r"[a-z]+")
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True)
class Dataset:
    """One benchmark input: texts, their intended token lengths, and the Parquet file holding them."""

    name: str
    texts: list[str]
    lengths: np.ndarray  # tokens per row including [CLS] and [SEP], before any truncation
    path: Path

    @property
    def rows(self) -> int:
        return len(self.texts)


def whole_words(vocabulary: dict[str, int]) -> list[str]:
    """Vocabulary entries that are plain lowercase alphabetic words (one token each)."""
    return sorted(token for token in vocabulary if _WORD.fullmatch(token))


def lognormal_parameters(mean: float = MIXED_MEAN_TOKENS, p99: float = MIXED_P99_TOKENS) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with this mean and 99th percentile.

    mean = exp(mu + sigma^2 / 2) and p99 = exp(mu + z99 sigma); subtracting the logs
    gives sigma^2 / 2 - z99 sigma + ln(p99 / mean) = 0, whose smaller root is taken.
    """
    gap = math.log(p99 / mean)
    sigma = _Z99 - math.sqrt(_Z99**2 - 2 * gap)
    return math.log(mean) - sigma**2 / 2, sigma


def mixed_lengths(rows: int, rng: np.random.Generator) -> np.ndarray:
    mu, sigma = lognormal_parameters()
    drawn = np.rint(rng.lognormal(mu, sigma, rows))
    return np.clip(drawn, MIN_TOKENS_PER_ROW, MAX_TOKENS_PER_ROW).astype(np.int64)


def texts_of_lengths(lengths: np.ndarray, words: list[str], rng: np.random.Generator) -> list[str]:
    """One text per length: ``length - 2`` random whole words."""
    vocabulary = np.asarray(words)
    return [" ".join(vocabulary[rng.integers(0, len(vocabulary), int(n) - SPECIAL_TOKENS_PER_ROW)]) for n in lengths]


def generate(name: str, lengths: np.ndarray, words: list[str], directory: Path, seed: int) -> Dataset:
    """Generate the texts for ``lengths`` and write them (with an ``id`` column) to ``directory/name.parquet``."""
    rng = np.random.default_rng(seed)
    texts = texts_of_lengths(lengths, words, rng)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.parquet"
    table = pa.table({ID_COLUMN: pa.array(np.arange(len(texts)), pa.int64()), TEXT_COLUMN: pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=4096, compression="zstd")
    return Dataset(name, texts, lengths.copy(), path)


def mixed_and_fixed_lengths(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token lengths of the two benchmark sets: ``mixed`` (log-normal) and ``fixed-128``."""
    rng = np.random.default_rng(seed)
    return {
        "mixed": mixed_lengths(rows, rng),
        f"fixed-{FIXED_TOKENS_PER_ROW}": np.full(rows, FIXED_TOKENS_PER_ROW, dtype=np.int64),
    }


def measured_lengths(tokenizer_file: Path, texts: list[str], max_length: int | None = None) -> np.ndarray:
    """Token counts as the model directory's tokenizer produces them (truncated at ``max_length``)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length)
    return np.fromiter((len(e.ids) for e in tokenizer.encode_batch(texts)), dtype=np.int64, count=len(texts))


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "rows": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "mean": float(lengths.mean()) if len(lengths) else 0.0,
        "p50": float(np.percentile(lengths, 50)) if len(lengths) else 0.0,
        "p99": float(np.percentile(lengths, 99)) if len(lengths) else 0.0,
        "max": int(lengths.max()) if len(lengths) else 0,
    }


def bucket_of(lengths: np.ndarray) -> np.ndarray:
    """Index into ``BUCKET_EDGES`` of each length (lengths above the last edge go to the last bucket)."""
    return np.minimum(np.searchsorted(np.asarray(BUCKET_EDGES), lengths, side="left"), len(BUCKET_EDGES) - 1)


def bucket_labels() -> list[str]:
    lower = (1,) + tuple(edge + 1 for edge in BUCKET_EDGES[:-1])
    return [f"{low}-{high}" for low, high in zip(lower, BUCKET_EDGES)]
