"""The spec of each task: its model class, its head, its ONNX outputs and their dynamic axes.

Every task in ``TASK_SPECS`` has a test (``tests/exporter/test_tasks.py`` fails if one is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exporter.architectures import ArchitectureSpec
from exporter.errors import ExportError
from worker.modeldir.manifest import Layers, Pooling, Task

if TYPE_CHECKING:
    from torch import nn

# Every input a graph may take; each family's graph takes those its model reads (ArchitectureSpec.input_names).
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
_BATCH_SEQUENCE = {0: "batch", 1: "sequence"}


@dataclass(frozen=True)
class HeadSettings:
    """Choices baked into the graph at export time."""

    pooling: Pooling = "mean"
    normalize: bool = False
    layers: Layers = "last"
    token_embeddings: bool = False
    top_k: int = 5
    mask_token_id: int | None = None


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    output_names: Callable[[HeadSettings], tuple[str, ...]]
    output_axes: dict[str, dict[int, str]]
    build_head: Callable[[Any, ArchitectureSpec, HeadSettings], nn.Module]


def _embedding_outputs(settings: HeadSettings) -> tuple[str, ...]:
    return ("embedding", "token_embeddings") if settings.token_embeddings else ("embedding",)


def _build_embedding_head(model: Any, architecture: ArchitectureSpec, settings: HeadSettings) -> nn.Module:
    from exporter.heads import EmbeddingHead

    if settings.pooling == "pooler":
        if settings.layers != "last":
            raise ExportError("--pooling pooler uses the last layer; it cannot be combined with --layers")
        if getattr(model, "pooler", None) is None:
            raise ExportError("--pooling pooler: this checkpoint has no pooler layer; use mean or cls")
    if settings.layers in ("sum-last-four", "concat-last-four"):
        # With fewer than four encoder layers, hidden_states[-4:] holds fewer than four tensors
        # and the graph's embedding size would not be the 4 x hidden the manifest records.
        layer_count = int(model.config.num_hidden_layers)
        if layer_count < 4:
            raise ExportError(
                f"--layers {settings.layers} needs at least 4 encoder layers; this checkpoint has {layer_count}. "
                "Use last or second-to-last"
            )
    return EmbeddingHead(model, settings.pooling, settings.normalize, settings.layers, settings.token_embeddings)


def _build_fill_mask_head(model: Any, architecture: ArchitectureSpec, settings: HeadSettings) -> nn.Module:
    from exporter.heads import FillMaskHead

    if settings.mask_token_id is None:
        raise ExportError(f"fill-mask: the tokenizer has no mask token, which {architecture.model_type} fill-mask needs")
    if settings.top_k < 1:
        raise ExportError(f"--top-k must be at least 1, got {settings.top_k}")
    encoder = getattr(model, architecture.encoder_attribute)
    lm_head = architecture.masked_lm_head(model)
    return FillMaskHead(encoder, lm_head, settings.mask_token_id, settings.top_k)


def _build_classifier_head(model: Any, architecture: ArchitectureSpec, settings: HeadSettings) -> nn.Module:
    from exporter.heads import ClassifierHead

    return ClassifierHead(model)


TASK_SPECS: dict[Task, TaskSpec] = {
    "embed": TaskSpec(
        task="embed",
        output_names=_embedding_outputs,
        output_axes={"embedding": {0: "batch"}, "token_embeddings": _BATCH_SEQUENCE},
        build_head=_build_embedding_head,
    ),
    "fill-mask": TaskSpec(
        task="fill-mask",
        output_names=lambda settings: ("mask_positions", "top_scores", "top_ids"),
        output_axes={"mask_positions": {0: "masks"}, "top_scores": {0: "masks"}, "top_ids": {0: "masks"}},
        build_head=_build_fill_mask_head,
    ),
    "classify": TaskSpec(
        task="classify",
        output_names=lambda settings: ("probs",),
        output_axes={"probs": {0: "batch"}},
        build_head=_build_classifier_head,
    ),
}


def dynamic_axes(
    spec: TaskSpec, settings: HeadSettings, input_names: tuple[str, ...] = INPUT_NAMES
) -> dict[str, dict[int, str]]:
    axes = {name: dict(_BATCH_SEQUENCE) for name in input_names}
    axes.update({name: spec.output_axes[name] for name in spec.output_names(settings)})
    return axes
