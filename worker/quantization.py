"""Embedding precisions for vector stores: float16, scalar int8/uint8, and packed sign bits.

The numbers are sentence-transformers' ``quantize_embeddings`` (``util/quantization.py``),
re-implemented with numpy only (the worker never imports torch or sentence-transformers):
the same bytes for ``binary``/``ubinary``, the same values for ``int8``/``uint8`` given the
same ranges. Pure functions, no I/O.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from worker.config import EmbeddingDtype

EMBEDDING_DTYPES: tuple[EmbeddingDtype, ...] = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SCALAR_DTYPES: tuple[EmbeddingDtype, ...] = ("int8", "uint8")

# The Parquet key-value metadata key of each shard that holds the int8/uint8 ranges (JSON).
RANGES_METADATA_KEY = b"bertbatch.quantization"


def needs_ranges(dtype: EmbeddingDtype) -> bool:
    """Whether the precision is scalar quantization, which needs per-dimension ranges."""
    return dtype in SCALAR_DTYPES


def quantization_ranges(calibration: np.ndarray) -> np.ndarray:
    """Per-dimension ``[min, max]`` of a calibration sample, shape ``(2, dim)`` float32.

    As sentence-transformers computes them (``np.vstack((min, max))`` over the rows).
    """
    sample = np.asarray(calibration)
    if sample.ndim != 2 or sample.shape[0] < 2:
        raise ValueError(
            f"int8/uint8 ranges need at least 2 calibration embeddings (rows x dimensions), got shape {sample.shape}"
        )
    return np.vstack((np.min(sample, axis=0), np.max(sample, axis=0))).astype(np.float32)


def quantize(embeddings: np.ndarray, dtype: EmbeddingDtype, ranges: np.ndarray | None = None) -> np.ndarray:
    """Embeddings (rows x dimensions, float) in ``dtype``; ``ranges`` is required for int8/uint8."""
    if dtype == "float32":
        return embeddings.astype(np.float32, copy=False)
    if dtype == "float16":
        return embeddings.astype(np.float16)
    if dtype in SCALAR_DTYPES:
        if ranges is None:
            raise ValueError(f"{dtype} quantization needs ranges")
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if dtype == "uint8" else (buckets - 128).astype(np.int8)
    if dtype == "binary":
        # packbits gives uint8; "- 128" wraps in uint8 and the cast reinterprets: a value's
        # bits XOR 0x80, exactly sentence-transformers' expression.
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    if dtype == "ubinary":
        return np.packbits(embeddings > 0, axis=-1)
    raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {', '.join(EMBEDDING_DTYPES)}")


def dequantize(values: np.ndarray, dtype: EmbeddingDtype, ranges: np.ndarray) -> np.ndarray:
    """Approximate float embeddings back from int8/uint8 values (the lower edge of each bucket)."""
    if dtype not in SCALAR_DTYPES:
        raise ValueError(f"only int8/uint8 embeddings can be dequantized, not {dtype}")
    ranges = np.asarray(ranges, dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = values.astype(np.float64) + (128 if dtype == "int8" else 0)
    return buckets * steps + ranges[0]


def stored_width(dtype: EmbeddingDtype, dimensions: int) -> int:
    """Values per row: the dimension, or one byte per 8 dimensions for packed bits."""
    return -(-dimensions // 8) if dtype in ("binary", "ubinary") else dimensions


def arrow_value_type(dtype: EmbeddingDtype) -> pa.DataType:
    """The Arrow type of one stored value (numpy's dtype of ``quantize``'s output)."""
    return {
        "float32": pa.float32(),
        "float16": pa.float16(),
        "int8": pa.int8(),
        "uint8": pa.uint8(),
        "binary": pa.int8(),
        "ubinary": pa.uint8(),
    }[dtype]


def embedding_type(dtype: EmbeddingDtype, dimensions: int) -> pa.DataType:
    """The Arrow type of the ``embedding`` column: a fixed-size list of ``stored_width`` values."""
    return pa.list_(arrow_value_type(dtype), stored_width(dtype, dimensions))
