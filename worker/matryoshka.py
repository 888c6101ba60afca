"""Matryoshka dimensions: keep the first N dimensions of an embedding. Pure numpy.

As sentence-transformers' ``encode(truncate_dim=N, normalize_embeddings=...)``: the
vectors are cut after the model (its ``Normalize`` module included) and L2-normalised
again when the export normalises, so cosine and dot product still agree.
"""

from __future__ import annotations

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (as ``torch.nn.functional.normalize``: a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(vectors.dtype, copy=False)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The first ``dimensions`` columns, renormalised when ``normalize``; ``None`` keeps them all."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    if dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    cut = vectors[..., :dimensions]
    return l2_normalize(cut) if normalize else np.ascontiguousarray(cut)
