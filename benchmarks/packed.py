"""Padding-free BERT in PyTorch: the strongest peer on GPU.

Rows are packed end to end into one ``[tokens, hidden]`` tensor, so no FLOP is spent
on padding; attention runs per row through the FlashAttention varlen kernel
(``torch.ops.aten._flash_attention_forward`` with cumulative sequence lengths).
The weights are the Hugging Face ``BertModel``'s own, with Q, K and V fused into one
matmul. On CPU (tests only) attention falls back to SDPA row by row, which checks
the packing, embeddings and pooling against transformers without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[tokens, heads, head_dim]`` in and out; rows delimited by ``cu_seqlens`` (int32, device)."""
    output = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False)
    return output[0]


def rowwise_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Reference attention for CPU: SDPA on each row separately (slow, exact)."""
    output = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        query, key, value = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, head_dim]
        output[start:end] = nn.functional.scaled_dot_product_attention(query, key, value)[0].transpose(0, 1)
    return output


class PackedBert:
    """A BertModel's encoder over packed rows, with the export's pooling and normalisation."""

    def __init__(self, model: Any, pooling: str, normalize: bool, attention: Attention) -> None:
        config = model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"packed BERT supports absolute position embeddings, not {config.position_embedding_type}")
        self.model = model.eval()
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.pooling = pooling
        self.normalize = normalize
        self.attention = attention
        self.fused_qkv = [
            (
                torch.cat([a.query.weight, a.key.weight, a.value.weight]).detach(),
                torch.cat([a.query.bias, a.key.bias, a.value.bias]).detach(),
            )
            for a in (layer.attention.self for layer in model.encoder.layer)
        ]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
        """Pooled embeddings ``[rows, hidden]`` of packed rows: ``input_ids`` and ``token_type_ids`` are ``[tokens]``."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        # output_size spares a device-to-host sync on CUDA
        row_of_token = torch.repeat_interleave(
            torch.arange(len(lengths), device=input_ids.device), lengths.long(), output_size=input_ids.shape[0]
        )
        positions = torch.arange(input_ids.shape[0], device=input_ids.device) - cu_seqlens[:-1].long()[row_of_token]
        embeddings = self.model.embeddings
        hidden = (
            embeddings.word_embeddings(input_ids)
            + embeddings.position_embeddings(positions)
            + embeddings.token_type_embeddings(token_type_ids)
        )
        hidden = embeddings.LayerNorm(hidden)
        for layer, (qkv_weight, qkv_bias) in zip(self.model.encoder.layer, self.fused_qkv):
            hidden = self._layer(layer, qkv_weight, qkv_bias, hidden, cu_seqlens, max_len)
        return self._pool(hidden, row_of_token, cu_seqlens, lengths)

    def _layer(self, layer: Any, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = nn.functional.linear(hidden, qkv_weight, qkv_bias).view(tokens, 3, self.heads, self.head_dim).unbind(1)
        context = self.attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len).reshape(tokens, -1)
        attention_output = layer.attention.output
        hidden = attention_output.LayerNorm(attention_output.dense(context) + hidden)
        intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
        return layer.output.LayerNorm(layer.output.dense(intermediate) + hidden)

    def _pool(self, hidden: torch.Tensor, row_of_token: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        firsts = hidden[cu_seqlens[:-1].long()]
        if self.pooling == "mean":
            sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
            sums.index_add_(0, row_of_token, hidden.float())
            pooled = sums / lengths.unsqueeze(1).float()
        elif self.pooling == "cls":
            pooled = firsts.float()
        elif self.pooling == "pooler":
            pooled = self.model.pooler.activation(self.model.pooler.dense(firsts)).float()
        else:
            raise ValueError(f"unknown pooling {self.pooling!r}")
        return nn.functional.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


def pack(token_ids: list[list[int]], type_ids: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Concatenate rows into ``(input_ids, token_type_ids, cu_seqlens, max_len)`` on ``device``."""
    import numpy as np

    lengths = np.fromiter((len(row) for row in token_ids), dtype=np.int64, count=len(token_ids))
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    ids = torch.from_numpy(np.concatenate([np.asarray(row, dtype=np.int64) for row in token_ids]))
    types = torch.from_numpy(np.concatenate([np.asarray(row, dtype=np.int64) for row in type_ids]))
    pin = device.startswith("cuda")
    if pin:
        ids, types = ids.pin_memory(), types.pin_memory()
    return (
        ids.to(device, non_blocking=pin),
        types.to(device, non_blocking=pin),
        torch.from_numpy(cu_seqlens).to(device),
        int(lengths.max()),
    )
