"""Embedding precisions against sentence-transformers' ``quantize_embeddings`` (same bytes, same values)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from worker.matryoshka import l2_normalize, truncate_dimensions
from worker.quantization import dequantize, embedding_type, quantization_ranges, quantize, stored_width


def _embeddings(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors[0, :5] = 0.0  # exact zeros: the sign bit of 0 is "not > 0"
    return l2_normalize(vectors)


@pytest.mark.parametrize("dim", [384, 20])  # 20: not a multiple of 8, packbits pads the last byte
@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_packed_bits_are_sentence_transformers_bytes(precision: str, dim: int) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    embeddings = _embeddings(50, dim)
    expected = quantize_embeddings(embeddings, precision=precision)
    got = quantize(embeddings, precision)  # type: ignore[arg-type]
    assert got.dtype == expected.dtype and got.shape == expected.shape == (50, stored_width(precision, dim))  # type: ignore[arg-type]
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_scalar_quantization_equals_sentence_transformers_given_the_same_ranges(precision: str) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    calibration = _embeddings(200, 384, seed=1)
    embeddings = _embeddings(60, 384, seed=2) * 1.5  # some values outside the calibration range: clipped
    ranges = quantization_ranges(calibration)
    expected = quantize_embeddings(embeddings, precision=precision, calibration_embeddings=calibration)
    assert np.array_equal(ranges, np.vstack((calibration.min(axis=0), calibration.max(axis=0))))
    got = quantize(embeddings, precision, ranges)  # type: ignore[arg-type]
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)
    assert np.array_equal(got, quantize_embeddings(embeddings, precision=precision, ranges=ranges))


def test_constant_dimension_and_dequantization() -> None:
    calibration = _embeddings(10, 8)
    calibration[:, 3] = 0.25  # max == min: step 1, as sentence-transformers does
    ranges = quantization_ranges(calibration)
    values = quantize(calibration, "int8", ranges)
    restored = dequantize(values, "int8", ranges)
    step = (ranges[1] - ranges[0]) / 255
    assert np.all(np.abs(restored - calibration) <= np.where(step == 0, 1, step) + 1e-6)
    assert np.array_equal(dequantize(quantize(calibration, "uint8", ranges), "uint8", ranges), restored)


def test_ranges_need_a_sample() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        quantization_ranges(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="needs ranges"):
        quantize(np.zeros((2, 4), np.float32), "uint8")


def test_arrow_types() -> None:
    assert embedding_type("float32", 384) == pa.list_(pa.float32(), 384)
    assert embedding_type("float16", 384) == pa.list_(pa.float16(), 384)
    assert embedding_type("int8", 384) == pa.list_(pa.int8(), 384)
    assert embedding_type("binary", 384) == pa.list_(pa.int8(), 48)
    assert embedding_type("ubinary", 20) == pa.list_(pa.uint8(), 3)


def test_float16_is_half_of_the_float_values() -> None:
    embeddings = _embeddings(4, 16)
    assert np.array_equal(quantize(embeddings, "float16"), embeddings.astype(np.float16))


def test_matryoshka_truncation_renormalises_only_when_asked() -> None:
    embeddings = _embeddings(5, 16)
    cut = truncate_dimensions(embeddings, 6, normalize=True)
    assert cut.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cut, embeddings[:, :6] / np.linalg.norm(embeddings[:, :6], axis=1, keepdims=True), rtol=1e-6)
    assert np.array_equal(truncate_dimensions(embeddings, 6, normalize=False), embeddings[:, :6])
    assert truncate_dimensions(embeddings, None, normalize=True) is embeddings
