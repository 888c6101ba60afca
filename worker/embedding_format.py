"""The ``embedding`` column as a job asks for it: Matryoshka dimensions, then a storage precision.

Decided once per job (int8/uint8 ranges included, see ``worker/calibration.py``), so
every window, shard and resumed run writes the same type with the same ranges; each
shard also carries the ranges in its Parquet key-value metadata for readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from worker.modeldir.manifest import Manifest
from worker.config import EmbeddingDtype, RunConfig
from worker.errors import UsageError
from worker.matryoshka import truncate_dimensions
from worker.quantization import RANGES_METADATA_KEY, embedding_type, needs_ranges, quantize, stored_width


@dataclass(frozen=True)
class EmbeddingFormat:
    """How pooled embeddings are written. ``ranges`` is ``(mins, maxs)`` for int8/uint8."""

    model_dimensions: int
    dimensions: int
    normalize: bool
    dtype: EmbeddingDtype = "float32"
    ranges: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def is_default(self) -> bool:
        return self.dimensions == self.model_dimensions and self.dtype == "float32"

    @property
    def arrow_type(self) -> pa.DataType:
        return embedding_type(self.dtype, self.dimensions)

    def with_ranges(self, ranges: np.ndarray) -> EmbeddingFormat:
        mins, maxs = (tuple(float(value) for value in row) for row in np.asarray(ranges, dtype=np.float32))
        return EmbeddingFormat(self.model_dimensions, self.dimensions, self.normalize, self.dtype, (mins, maxs))

    def float_vectors(self, pooled: np.ndarray) -> np.ndarray:
        """Pooled embeddings cut to ``dimensions`` (renormalised when the export normalises), float32."""
        return truncate_dimensions(pooled.astype(np.float32, copy=False), self.dimensions, self.normalize)

    def column(self, vectors: np.ndarray, null: np.ndarray) -> pa.Array:
        """The ``embedding`` column from ``float_vectors``' output; ``null`` rows are null."""
        ranges = None if self.ranges is None else np.asarray(self.ranges, dtype=np.float32)
        if needs_ranges(self.dtype) and ranges is None:
            raise ValueError(f"{self.dtype} embeddings need calibration ranges")
        stored = quantize(vectors, self.dtype, ranges)
        width = stored_width(self.dtype, self.dimensions)
        mask = pa.array(null) if null.any() else None
        values = pa.array(stored.reshape(-1), type=self.arrow_type.value_type)
        return pa.FixedSizeListArray.from_arrays(values, width, mask=mask)

    def metadata(self) -> dict[bytes, bytes]:
        """The shards' key-value metadata: dtype, dimensions and (int8/uint8) the ranges to dequantize with."""
        if self.is_default:
            return {}
        record: dict[str, object] = {"dtype": self.dtype, "dimensions": self.dimensions, "normalized": self.normalize}
        if self.ranges is not None:
            record["ranges"] = [list(self.ranges[0]), list(self.ranges[1])]
        return {RANGES_METADATA_KEY: json.dumps(record).encode()}


def plan_embedding_format(config: RunConfig, manifest: Manifest) -> EmbeddingFormat | None:
    """The job's embedding format (``None`` for tasks without embeddings); usage errors for bad options."""
    if manifest.task != "embed":
        if config.dimensions is not None or config.embedding_dtype != "float32" or config.calibration is not None:
            raise UsageError(f"--dimensions, --embedding-dtype and --calibration apply to embed models; this is a {manifest.task} model")
        return None
    model_dimensions = manifest.embedding_dim or 0
    if config.dimensions is not None and not 1 <= config.dimensions <= model_dimensions:
        raise UsageError(f"--dimensions must be between 1 and the model's {model_dimensions}, got {config.dimensions}")
    if config.calibration is not None and not needs_ranges(config.embedding_dtype):
        raise UsageError("--calibration applies to --embedding-dtype int8 and uint8")
    if needs_ranges(config.embedding_dtype) and config.calibration is None and config.calibration_rows < 2:
        raise UsageError(f"--calibration-rows must be at least 2, got {config.calibration_rows}")
    return EmbeddingFormat(model_dimensions, config.dimensions or model_dimensions, manifest.normalize, config.embedding_dtype)
