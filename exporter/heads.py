"""The in-graph heads: small torch modules around the encoder so only small tensors leave the model.

Every head takes ``(input_ids, attention_mask)``, plus ``token_type_ids`` for the
families that read them (``ArchitectureSpec.input_names``), and is put in eval
mode by its constructor: ``torch.onnx.export`` restores a module's training flag
recursively afterwards, so a wrapper left in training mode would silently turn
dropout back on in the PyTorch reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.modeldir.manifest import Activation, Layers, Pooling


def select_layers(hidden_states: tuple[torch.Tensor, ...], layers: Layers) -> torch.Tensor:
    """Combine hidden layers the way the BERT feature-extraction literature does."""
    if layers == "last":
        return hidden_states[-1]
    if layers == "second-to-last":
        return hidden_states[-2]
    if layers == "sum-last-four":
        return torch.stack(hidden_states[-4:], dim=0).sum(dim=0)
    if layers == "concat-last-four":
        return torch.cat(hidden_states[-4:], dim=-1)
    raise ValueError(f"unknown layers choice {layers!r}")


def encoder_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The keyword inputs of a transformers model: ``token_type_ids`` only where the graph takes them."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return inputs


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average over real tokens only: padding never enters the mean."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingHead(nn.Module):
    """Encoder + pooling (+ optional L2 normalisation, + optional per-token vectors)."""

    def __init__(
        self,
        encoder: Any,
        pooling: Pooling,
        normalize: bool,
        layers: Layers,
        token_embeddings: bool,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.layers = layers
        self.token_embeddings = token_embeddings
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        # pooling_mask (exports of sentence-transformers models with include_prompt false): the
        # tokens mean pooling averages, the attention mask less the prompt's tokens.
        output = self.encoder(
            **encoder_inputs(input_ids, attention_mask, token_type_ids), output_hidden_states=self.layers != "last"
        )
        hidden = output.last_hidden_state if self.layers == "last" else select_layers(output.hidden_states, self.layers)
        if self.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask if pooling_mask is None else pooling_mask)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = output.pooler_output
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        if self.token_embeddings:
            return pooled, hidden
        return (pooled,)


class FillMaskHead(nn.Module):
    """Encoder + vocabulary projection at ``[MASK]`` positions only, softmax and top-k in the graph.

    Outputs ``mask_positions`` (n, 2) as (row, token), and ``top_scores`` /
    ``top_ids`` (n, k): the vocabulary logits are never materialised for the
    other tokens, and never leave the device.
    """

    def __init__(self, encoder: Any, lm_head: Any, mask_token_id: int, top_k: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.lm_head = lm_head
        self.mask_token_id = mask_token_id
        self.top_k = top_k
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(**encoder_inputs(input_ids, attention_mask, token_type_ids)).last_hidden_state
        positions = torch.nonzero(input_ids == self.mask_token_id)
        selected = hidden[positions[:, 0], positions[:, 1]]
        probabilities = torch.softmax(self.lm_head(selected), dim=-1)
        top_scores, top_ids = torch.topk(probabilities, k=self.top_k, dim=-1)
        return positions, top_scores, top_ids


class ClassifierHead(nn.Module):
    """Sequence classifier + its activation: the graph emits ``probs`` (activated) and ``logits`` (raw).

    The activation runs on float32 logits: in a float16 graph the encoder is converted and this
    head is not (exporter/optimize.py), so a half-precision sigmoid cannot saturate scores into ties.
    """

    def __init__(self, classifier: Any, activation: Activation) -> None:
        super().__init__()
        self.classifier = classifier
        self.activation = activation
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        logits = self.classifier(**encoder_inputs(input_ids, attention_mask, token_type_ids)).logits.float()
        if self.activation == "softmax":
            probs = torch.softmax(logits, dim=-1)
        elif self.activation == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = logits.clone()  # a separate graph output, not an alias of ``logits``
        return probs, logits


class TokenClassifierHead(nn.Module):
    """Token classifier + softmax over the labels of each token: the graph emits ``token_probs``
    (batch x sequence x labels); the worker reads the real tokens' rows and aggregates them."""

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        logits = self.classifier(**encoder_inputs(input_ids, attention_mask, token_type_ids)).logits.float()
        return (torch.softmax(logits, dim=-1),)
