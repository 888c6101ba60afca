"""Numpy references for the onnxruntime contrib (``com.microsoft``) operators in our fused and packed BERT graphs.

onnxruntime runs ``RemovePadding``, ``PackedAttention`` and ``RestorePadding`` on CUDA
only, so a packed graph's numbers cannot be checked on a CPU with onnxruntime. These
classes let ``onnx.reference.ReferenceEvaluator`` run it instead; they follow the
operator schemas (docs/ContribOperators.md) and, where the schema is silent, the CUDA
kernels (contrib_ops/cuda/bert/bert_padding.cu, packed_attention_impl.cu). Each is
checked against onnxruntime CPU on the fused graph (tests/exporter/test_packing_reference.py).

The math runs in float64 and is rounded to the input's float type at the end, so a
reference output is exact up to that rounding. Inputs a kernel would read out of
bounds, or read differently on CPU and CUDA, are refused with ``ValueError``: a
reference must not quietly pick one of two behaviours. Features our graphs never use
(past state, rotary embeddings, causal attention) raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx.reference.op_run import OpRun

if TYPE_CHECKING:
    from onnx import ModelProto
    from onnx.reference import ReferenceEvaluator

DOMAIN = "com.microsoft"
# Attention's default mask_filter_value: added to the scores of masked keys.
MASK_FILTER_VALUE = -10000.0
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _wide(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _require_int32(name: str, value: np.ndarray) -> None:
    # The schemas constrain every index tensor of these operators to tensor(int32).
    if value.dtype != np.int32:
        raise ValueError(f"{name} must be int32 (the schema's type M), got {value.dtype}")


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, epsilon: float) -> tuple[np.ndarray, ...]:
    mean = x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + epsilon)
    y = (x - mean) * inv_std * _wide(gamma)
    if beta is not None:
        y = y + _wide(beta)
    return y, mean, inv_std


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x * Phi(x), as com.microsoft Gelu and BiasGelu compute it."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _qkv_sizes(bias_or_weights_width: int, qkv_hidden_sizes: list[int] | None, num_heads: int) -> tuple[int, int, int]:
    if qkv_hidden_sizes:
        q, k, v = (int(size) for size in qkv_hidden_sizes)
    else:
        q = k = v = bias_or_weights_width // 3
    if q != k or q + k + v != bias_or_weights_width or q % num_heads or v % num_heads:
        raise ValueError(
            f"Q/K/V hidden sizes {(q, k, v)} do not fit weights of width {bias_or_weights_width} and {num_heads} heads"
        )
    return q, k, v


def _attend(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, scale: float | None, additive: np.ndarray | None
) -> np.ndarray:
    """Multi-head attention of one sequence: q, k ``[S, D]``, v ``[S, Dv]``, ``additive`` broadcast to ``[N, S, S]``."""
    length = q.shape[0]
    head = q.shape[1] // num_heads
    heads_q = q.reshape(length, num_heads, head).transpose(1, 0, 2)
    heads_k = k.reshape(length, num_heads, head).transpose(1, 0, 2)
    heads_v = v.reshape(length, num_heads, -1).transpose(1, 0, 2)
    # The kernels treat scale 0 (the attribute's unset value) as the default 1/sqrt(head_size).
    factor = scale if scale else 1.0 / math.sqrt(head)
    scores = factor * heads_q @ heads_k.transpose(0, 2, 1)
    if additive is not None:
        scores = scores + additive
    return (_softmax(scores) @ heads_v).transpose(1, 0, 2).reshape(length, -1)


def right_padded_lengths(mask: np.ndarray) -> np.ndarray:
    """Per-row token counts of a right-padded 0/1 mask; ``ValueError`` for any other mask.

    onnxruntime's mask index differs by device: the CPU kernel counts the ones, the
    CUDA kernel finds the first zero. Only for right-padded rows do the two agree.
    """
    ones = mask == 1
    lengths = ones.sum(axis=1)
    expected = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(ones, expected) or not np.isin(mask, (0, 1)).all():
        rows = np.flatnonzero((ones != expected).any(axis=1) | ~np.isin(mask, (0, 1)).all(axis=1))
        raise ValueError(
            f"mask rows {rows.tolist()} are not right-padded 0/1 rows: onnxruntime's CPU and CUDA mask index "
            "disagree on them (count of ones vs first zero)"
        )
    return lengths.astype(np.int32)


def check_packing(token_offset: np.ndarray, cumulative: np.ndarray, token_count: int | None = None) -> None:
    """Raise ``ValueError`` unless ``token_offset`` and ``cumulative`` describe one right-padded packing.

    The CUDA kernels read both: the fused attention kernels only the cumulative lengths,
    the unfused one and RestorePadding the offsets; if they disagreed, the result would
    depend on which kernel ran.
    """
    _require_int32("token_offset", token_offset)
    _require_int32("cumulative_sequence_length", cumulative)
    if token_offset.ndim != 2:
        raise ValueError(f"token_offset must be [batch, sequence], got shape {token_offset.shape}")
    batch, sequence = token_offset.shape
    if cumulative.shape != (batch + 1,):
        raise ValueError(f"cumulative_sequence_length must have shape ({batch + 1},), got {cumulative.shape}")
    lengths = np.diff(cumulative)
    if cumulative[0] != 0 or (lengths < 0).any() or (lengths > sequence).any():
        raise ValueError(f"cumulative_sequence_length {cumulative.tolist()} is not 0 then per-row counts <= {sequence}")
    if token_count is not None and cumulative[-1] != token_count:
        raise ValueError(f"cumulative_sequence_length ends at {cumulative[-1]} but {token_count} tokens are packed")
    expected = expected_token_offset(lengths.astype(np.int32), sequence)
    if not np.array_equal(token_offset, expected):
        raise ValueError("token_offset does not list the rows' real tokens, then their padding, as RemovePadding does")


def expected_token_offset(lengths: np.ndarray, sequence: int) -> np.ndarray:
    """The CUDA ``getTokenOffset`` layout: every row's real positions in order, then every row's padding positions."""
    real = [row * sequence + np.arange(count) for row, count in enumerate(lengths)]
    padding = [row * sequence + np.arange(count, sequence) for row, count in enumerate(lengths)]
    flat = np.concatenate(real + padding) if len(lengths) else np.zeros(0)
    return flat.astype(np.int32).reshape(len(lengths), sequence)


class ContribOp(OpRun):
    """A com.microsoft operator. ``op_schema = None``: some names (Attention, Gelu) are also standard ONNX
    operators, whose schema would otherwise lend these classes its attributes and defaults."""

    op_domain = DOMAIN
    op_schema = None


class EmbedLayerNormalization(ContribOp):
    """Word + position (+ segment) embeddings, layer norm; the mask index is the per-row token count."""

    def _run(  # type: ignore[override]
        self,
        input_ids: np.ndarray,
        segment_ids: np.ndarray | None,
        word_embedding: np.ndarray,
        position_embedding: np.ndarray,
        segment_embedding: np.ndarray | None,
        gamma: np.ndarray,
        beta: np.ndarray,
        mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        epsilon: float = 1e-12,
        mask_index_type: int = 1,
    ) -> tuple[np.ndarray, ...]:
        _require_int32("input_ids", input_ids)
        batch, sequence = input_ids.shape
        if position_ids is None:
            positions = np.broadcast_to(np.arange(sequence), (batch, sequence))
        else:
            positions = np.broadcast_to(position_ids, (batch, sequence))
        segments = np.zeros_like(input_ids) if segment_ids is None else segment_ids
        tables = [("input_ids", input_ids, word_embedding), ("positions", positions, position_embedding)]
        if segment_embedding is not None:
            tables.append(("segment_ids", segments, segment_embedding))
        for name, ids, table in tables:
            if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
                raise ValueError(f"{name} out of range [0, {table.shape[0]}): {ids.min()}..{ids.max()}")
        summed = _wide(word_embedding)[input_ids] + _wide(position_embedding)[positions]
        if segment_embedding is not None:
            summed = summed + _wide(segment_embedding)[segments]
        output, _, _ = _layer_norm(summed, gamma, beta, epsilon)
        if mask is None:
            mask_index = np.zeros(batch, dtype=np.int32)
        else:
            mask_index = right_padded_lengths(mask)
        dtype = word_embedding.dtype
        # embedding_sum, per the CUDA kernel: word + position (+ segment), before the layer norm.
        return output.astype(dtype), mask_index, summed.astype(dtype)


class SkipLayerNormalization(ContribOp):
    """Layer norm of input + skip (+ bias); also its mean, inverse std and the sum."""

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        skip: np.ndarray,
        gamma: np.ndarray,
        beta: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        epsilon: float = 1e-12,
    ) -> tuple[np.ndarray, ...]:
        if x.ndim not in (2, 3) or skip.shape[-1] != x.shape[-1]:
            raise ValueError(f"SkipLayerNormalization input {x.shape} and skip {skip.shape} do not match")
        summed = _wide(x) + _wide(skip)
        if bias is not None:
            summed = summed + _wide(bias)
        output, mean, inv_std = _layer_norm(summed, gamma, beta, epsilon)
        return output.astype(x.dtype), mean.astype(np.float32), inv_std.astype(np.float32), summed.astype(x.dtype)


class BiasGelu(ContribOp):
    """Exact (erf) GELU of A + B."""

    def _run(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray]:  # type: ignore[override]
        return (_gelu(_wide(a) + _wide(b)).astype(a.dtype),)


class Gelu(ContribOp):
    """Exact (erf) GELU."""

    def _run(self, x: np.ndarray) -> tuple[np.ndarray]:  # type: ignore[override]
        return (_gelu(_wide(x)).astype(x.dtype),)


class FastGelu(ContribOp):
    """Tanh-approximated GELU, with an optional bias added first."""

    def _run(self, x: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray]:  # type: ignore[override]
        y = _wide(x) if bias is None else _wide(x) + _wide(bias)
        return ((0.5 * y * (1.0 + np.tanh(0.7978845608028654 * (y + 0.044715 * y**3)))).astype(x.dtype),)


class Attention(ContribOp):
    """Self-attention over a padded batch; a 1-D mask_index holds each row's length (right padding)."""

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        weights: np.ndarray,
        bias: np.ndarray | None = None,
        mask_index: np.ndarray | None = None,
        past: np.ndarray | None = None,
        attention_bias: np.ndarray | None = None,
        past_sequence_length: np.ndarray | None = None,
        num_heads: int = 0,
        qkv_hidden_sizes: list[int] | None = None,
        scale: float | None = None,
        unidirectional: int = 0,
        mask_filter_value: float = MASK_FILTER_VALUE,
        do_rotary: int = 0,
        past_present_share_buffer: int = 0,
        rotary_embedding_dim: int = 0,
    ) -> tuple[np.ndarray]:
        if past is not None or past_sequence_length is not None or unidirectional or do_rotary or past_present_share_buffer:
            raise NotImplementedError("Attention reference: past state, causal and rotary attention are not implemented")
        if num_heads <= 0:
            raise ValueError("Attention needs num_heads > 0")
        batch, sequence, _ = x.shape
        q_size, k_size, _ = _qkv_sizes(weights.shape[1], qkv_hidden_sizes, num_heads)
        qkv = _wide(x) @ _wide(weights)
        if bias is not None:
            qkv = qkv + _wide(bias)
        additive = np.zeros((batch, 1, sequence, sequence))
        if mask_index is not None:
            additive = additive + _attention_mask(mask_index, batch, sequence, mask_filter_value)[:, None]
        if attention_bias is not None:
            additive = additive + _wide(attention_bias)
        rows = [
            _attend(row[:, :q_size], row[:, q_size : q_size + k_size], row[:, q_size + k_size :], num_heads, scale, extra)
            for row, extra in zip(qkv, additive)
        ]
        return (np.stack(rows).astype(x.dtype),)


def _attention_mask(mask_index: np.ndarray, batch: int, sequence: int, filter_value: float) -> np.ndarray:
    """Attention's mask_index as an additive ``[batch, sequence, sequence]`` mask (filter_value where masked)."""
    _require_int32("mask_index", mask_index)
    keys = np.arange(sequence)
    if mask_index.shape == (batch,):  # end positions: right padding
        keep = keys[None, None, :] < mask_index[:, None, None]
    elif mask_index.shape == (2 * batch,):  # exclusive end positions, then inclusive start positions: left padding
        end, start = mask_index[:batch], mask_index[batch:]
        keep = (keys[None, None, :] < end[:, None, None]) & (keys[None, None, :] >= start[:, None, None])
    elif mask_index.shape == (batch, sequence):  # raw 0/1 mask over keys
        keep = (mask_index > 0)[:, None, :]
    elif mask_index.shape == (batch, sequence, sequence):
        keep = mask_index > 0
    else:
        raise NotImplementedError(f"Attention reference: mask_index of shape {mask_index.shape} is not implemented")
    return np.where(np.broadcast_to(keep, (batch, sequence, sequence)), 0.0, filter_value)


class RemovePadding(ContribOp):
    """Packs the real tokens of right-padded rows: ``[batch, sequence, hidden]`` -> ``[tokens, hidden]``."""

    def _run(self, x: np.ndarray, sequence_token_count: np.ndarray) -> tuple[np.ndarray, ...]:  # type: ignore[override]
        _require_int32("sequence_token_count", sequence_token_count)
        if x.ndim != 3 or sequence_token_count.shape != (x.shape[0],):
            raise ValueError(
                f"RemovePadding needs input [batch, sequence, hidden] and counts [batch], "
                f"got {x.shape} and {sequence_token_count.shape}"
            )
        batch, sequence, hidden = x.shape
        if (sequence_token_count < 0).any() or (sequence_token_count > sequence).any():
            # getTokenOffset trusts the counts: outside [0, sequence] it reads and writes out of bounds.
            raise ValueError(f"sequence_token_count {sequence_token_count.tolist()} outside [0, {sequence}]")
        token_offset = expected_token_offset(sequence_token_count, sequence)
        token_count = int(sequence_token_count.sum())
        packed = x.reshape(batch * sequence, hidden)[token_offset.reshape(-1)[:token_count]]
        cumulative = np.concatenate([[0], np.cumsum(sequence_token_count)]).astype(np.int32)
        max_count = np.array([sequence_token_count.max(initial=0)], dtype=np.int32)
        return packed, token_offset, cumulative, max_count


class PackedAttention(ContribOp):
    """Self-attention over packed tokens, each row's tokens attending only to each other."""

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        weights: np.ndarray,
        bias: np.ndarray,
        token_offset: np.ndarray,
        cumulative_sequence_length: np.ndarray,
        attention_bias: np.ndarray | None = None,
        num_heads: int = 0,
        qkv_hidden_sizes: list[int] | None = None,
        scale: float | None = None,
    ) -> tuple[np.ndarray]:
        if num_heads <= 0:
            raise ValueError("PackedAttention needs num_heads > 0")
        if x.ndim != 2:
            raise ValueError(f"PackedAttention input must be [token_count, hidden] in packing mode, got {x.shape}")
        check_packing(token_offset, cumulative_sequence_length, x.shape[0])
        batch, sequence = token_offset.shape
        q_size, k_size, v_size = _qkv_sizes(bias.shape[0], qkv_hidden_sizes, num_heads)
        if attention_bias is not None and (
            attention_bias.ndim != 4
            or attention_bias.shape[0] not in (1, batch)
            or attention_bias.shape[1] not in (1, num_heads)
            or attention_bias.shape[2:] != (sequence, sequence)
        ):
            raise ValueError(
                f"attention_bias must be [batch or 1, heads or 1, {sequence}, {sequence}], got {attention_bias.shape}"
            )
        qkv = _wide(x) @ _wide(weights) + _wide(bias)
        output = np.zeros((x.shape[0], v_size))
        for row in range(batch):
            start, end = int(cumulative_sequence_length[row]), int(cumulative_sequence_length[row + 1])
            if start == end:
                continue
            tokens = qkv[start:end]
            extra = None
            if attention_bias is not None:
                length = end - start
                extra = _wide(attention_bias[min(row, attention_bias.shape[0] - 1), :, :length, :length])
            output[start:end] = _attend(
                tokens[:, :q_size], tokens[:, q_size : q_size + k_size], tokens[:, q_size + k_size :], num_heads, scale, extra
            )
        return (output.astype(x.dtype),)


class RestorePadding(ContribOp):
    """Unpacks ``[tokens, hidden]`` to ``[batch, sequence, hidden]`` with zeros at padding positions."""

    def _run(self, x: np.ndarray, token_offset: np.ndarray) -> tuple[np.ndarray]:  # type: ignore[override]
        _require_int32("token_offset", token_offset)
        if x.ndim != 2 or token_offset.ndim != 2:
            raise ValueError(
                f"RestorePadding needs input [tokens, hidden] and token_offset [batch, sequence], "
                f"got {x.shape} and {token_offset.shape}"
            )
        batch, sequence = token_offset.shape
        flat = token_offset.reshape(-1)
        if x.shape[0] > flat.size or not np.array_equal(np.sort(flat), np.arange(flat.size)):
            raise ValueError(
                f"RestorePadding: {x.shape[0]} tokens do not fit token_offset of shape {token_offset.shape}, "
                "or it is not a permutation of the padded positions"
            )
        output = np.zeros((batch * sequence, x.shape[1]), dtype=x.dtype)
        output[flat[: x.shape[0]]] = x
        return (output.reshape(batch, sequence, x.shape[1]),)


CONTRIB_OPS: tuple[type[OpRun], ...] = (
    EmbedLayerNormalization,
    SkipLayerNormalization,
    BiasGelu,
    Gelu,
    FastGelu,
    Attention,
    RemovePadding,
    PackedAttention,
    RestorePadding,
)


def reference_evaluator(model: ModelProto | Path) -> ReferenceEvaluator:
    """A ``ReferenceEvaluator`` for ``model`` with these contrib operators."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(model) if isinstance(model, Path) else model, new_ops=list(CONTRIB_OPS))


def evaluate(
    evaluator: ReferenceEvaluator, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
) -> list[np.ndarray]:
    """Run ``evaluator`` and return ``outputs`` (default: the graph's outputs; any tensor name works) in order."""
    results = evaluator.run(outputs, feeds)
    assert isinstance(results, list)
    return results
