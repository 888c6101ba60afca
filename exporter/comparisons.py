"""How one ONNX output is held against PyTorch's: the comparisons a task's spec picks for each output.

Each comparison takes PyTorch's array (``expected``), onnxruntime's (``got``), the
case's other outputs and its attention mask, and the tolerances, and measures the
difference as ``OutputStats``; ``mismatches`` counts what fails. ``exporter/tasks.py``
names one per output, so a new output cannot go unvalidated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from exporter.validation import Tolerances


@dataclass
class OutputStats:
    max_abs: float = 0.0
    max_rel: float = 0.0
    min_cosine: float | None = None
    mismatches: int = 0
    mean_cosine: float | None = None
    vectors: int = 0  # how many vectors the cosines cover

    def merge(self, other: OutputStats) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        if other.min_cosine is not None:
            self.min_cosine = other.min_cosine if self.min_cosine is None else min(self.min_cosine, other.min_cosine)
        if other.mean_cosine is not None and other.vectors:
            total = self.vectors + other.vectors
            previous = (self.mean_cosine or 0.0) * self.vectors
            self.mean_cosine = (previous + other.mean_cosine * other.vectors) / total
            self.vectors = total
        self.mismatches += other.mismatches


@dataclass(frozen=True)
class CaseOutputs:
    """One validation case: its attention mask, and each output as (PyTorch's, onnxruntime's)."""

    attention_mask: np.ndarray
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]


Comparison = Callable[[np.ndarray, np.ndarray, CaseOutputs, "Tolerances"], OutputStats]
_ReducedPrecisionRule = Callable[[np.ndarray, np.ndarray, np.ndarray, float, float, "Tolerances"], OutputStats]


def exact(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
    """Integers that must be equal everywhere (``mask_positions``)."""
    return OutputStats(mismatches=int((expected != got).sum()))


def elementwise(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
    """Every element within ``atol + rtol x |PyTorch|``, at every precision (``top_scores``)."""
    return _numeric(expected, got, tolerances, None)


def vectors(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
    """Element-wise in float32; by each vector's cosine with PyTorch's at reduced precision (``min_cosine``)."""
    return _numeric(expected, got, tolerances, _by_cosine)


def probabilities(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
    """Element-wise in float32; at reduced precision within ``atol`` (times the row's largest |score| for raw
    scores above 1: ``logits``), with the same top-1 label except near-ties."""
    return _numeric(expected, got, tolerances, _by_top_label)


def tied_ranking(scores_output: str) -> Comparison:
    """Top-k ids (``top_ids``) equal to PyTorch's, except where the scores in ``scores_output`` tie."""

    def compare(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
        scores_expected, scores_got = case.pairs[scores_output]
        differ = expected != got
        # A differing id is a near-tie only when PyTorch ranks that same id with a score within
        # tolerance, or when its score ties PyTorch's k-th score (the tie crosses the top-k cut).
        # Equal scores alone are not enough: wrong ids with right scores must fail.
        same_id = got[..., :, None] == expected[..., None, :]
        same_score = np.isclose(scores_got[..., :, None], scores_expected[..., None, :],
                                atol=tolerances.atol, rtol=tolerances.rtol)
        listed_tie = (same_id & same_score).any(axis=-1)
        cut_tie = np.isclose(scores_got, scores_expected[..., -1:], atol=tolerances.atol, rtol=tolerances.rtol)
        return OutputStats(mismatches=int((differ & ~(listed_tie | cut_tie)).sum()))

    return compare


def at_valid_positions(comparison: Comparison) -> Comparison:
    """``comparison`` over the real tokens only (per-token outputs: padding positions are free)."""

    def compare(expected: np.ndarray, got: np.ndarray, case: CaseOutputs, tolerances: Tolerances) -> OutputStats:
        valid = case.attention_mask.astype(bool)
        return comparison(expected[valid], got[valid], case, tolerances)

    return compare


def _numeric(
    expected: np.ndarray, got: np.ndarray, tolerances: Tolerances, reduced_precision: _ReducedPrecisionRule | None
) -> OutputStats:
    expected64, got64 = expected.astype(np.float64), got.astype(np.float64)
    difference = np.abs(got64 - expected64)
    max_abs = float(difference.max(initial=0.0))
    max_rel = float((difference / np.maximum(np.abs(expected64), 1e-6)).max(initial=0.0))
    if np.isnan(got64).any():
        return OutputStats(max_abs=float("nan"), max_rel=float("nan"), mismatches=int(np.isnan(got64).sum()))
    if tolerances.min_cosine is not None and reduced_precision is not None:
        return reduced_precision(expected64, got64, difference, max_abs, max_rel, tolerances)
    close = difference <= tolerances.atol + tolerances.rtol * np.abs(expected64)
    return OutputStats(max_abs, max_rel, None, int((~close).sum()))


def _by_cosine(
    expected: np.ndarray, got: np.ndarray, difference: np.ndarray, max_abs: float, max_rel: float, tolerances: Tolerances
) -> OutputStats:
    assert tolerances.min_cosine is not None
    cosine = _row_cosine(expected.reshape(-1, expected.shape[-1]), got.reshape(-1, got.shape[-1]))
    min_cosine = float(cosine.min(initial=1.0))
    mean_cosine = float(cosine.mean()) if cosine.size else None
    mismatches = int((cosine < tolerances.min_cosine).sum())
    return OutputStats(max_abs, max_rel, min_cosine, mismatches, mean_cosine, int(cosine.size))


def _by_top_label(
    expected: np.ndarray, got: np.ndarray, difference: np.ndarray, max_abs: float, max_rel: float, tolerances: Tolerances
) -> OutputStats:
    # Raw scores (logits, or the probs of a head without activation) live on the logits' scale:
    # there the absolute tolerance counts per unit of the row's largest |score|. Probabilities have scale 1.
    scale = np.maximum(1.0, np.abs(expected).max(axis=-1, initial=0.0))
    top1_differs = expected.argmax(-1) != got.argmax(-1)
    sorted_probs = np.sort(expected, axis=-1)
    margin = sorted_probs[..., -1] - (sorted_probs[..., -2] if expected.shape[-1] > 1 else 0.0)
    beyond = (difference > tolerances.atol * scale[..., None]).any(-1)
    mismatches = int((top1_differs & (margin > 2 * tolerances.atol * scale)).sum()) + int(beyond.sum())
    return OutputStats(max_abs, max_rel, None, mismatches)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-12)
