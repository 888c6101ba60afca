"""The exporter's spec of each task: every fact about a task the exporter needs, in one place.

A spec names the transformers class that loads the checkpoint and the head weights
that must not be missing, builds the head baked into the graph, lists the ONNX
outputs with their dynamic axes and the comparison that validates each, and gives
the manifest fields the task records. The worker's half of a task (its result
columns and decoding) is ``worker/decode.py``. Adding a task means one spec here,
one decoder there, and their tests: ``tests/test_task_registry.py`` fails when a
task misses either, or has no test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exporter import comparisons
from exporter.architectures import ArchitectureSpec
from exporter.comparisons import Comparison
from exporter.errors import ExportError
from worker.modeldir.manifest import Activation, Layers, Manifest, Pooling, Task

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
    activation: Activation = "softmax"  # classify; exporter/activation.py chooses it from the checkpoint


@dataclass(frozen=True)
class HeadWeights:
    """The state-dict prefix of a task's head, to refuse checkpoints whose head would be random."""

    prefix: Callable[[ArchitectureSpec], str | tuple[str, ...]]
    checkpoint_kind: str  # "a masked-LM": what the checkpoint is not when they are missing


@dataclass(frozen=True)
class TaskSpec:
    """One task, as the exporter sees it.

    ``model_class`` is the ``transformers`` auto class that loads the checkpoint;
    ``head_weights`` is ``None`` where the base model is all the task needs.
    ``comparisons`` validates each output against PyTorch (``exporter/comparisons.py``).
    ``masked_inputs``: validation cases carry ``[MASK]`` tokens, and one case has none.
    ``reads_layers``: the head reads ``--layers`` (else the last hidden state).
    ``manifest_fields`` gives the manifest fields the task records, from the head
    settings and the model's config; the others keep the manifest's defaults.
    """

    task: Task
    model_class: str
    output_names: Callable[[HeadSettings], tuple[str, ...]]
    output_axes: dict[str, dict[int, str]]
    comparisons: dict[str, Comparison]
    build_head: Callable[[Any, ArchitectureSpec, HeadSettings], nn.Module]
    manifest_fields: Callable[[HeadSettings, Any], dict[str, Any]]
    head_weights: HeadWeights | None = None
    masked_inputs: bool = False
    reads_layers: bool = False

    def encoder_layers(self, settings: HeadSettings) -> Layers:
        """The hidden layers the head reads, which the optimizer must leave reachable."""
        return settings.layers if self.reads_layers else "last"


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

    return ClassifierHead(model, settings.activation)


def _build_token_classifier_head(model: Any, architecture: ArchitectureSpec, settings: HeadSettings) -> nn.Module:
    from exporter.heads import TokenClassifierHead

    return TokenClassifierHead(model)


def _embedding_manifest(settings: HeadSettings, model_config: Any) -> dict[str, Any]:
    hidden = int(model_config.hidden_size)
    return {
        "pooling": settings.pooling,
        "normalize": settings.normalize,
        "layers": settings.layers,
        "token_embeddings": settings.token_embeddings,
        "embedding_dim": hidden * 4 if settings.layers == "concat-last-four" else hidden,
    }


def _fill_mask_manifest(settings: HeadSettings, model_config: Any) -> dict[str, Any]:
    return {"top_k": settings.top_k}


def _labels_manifest(settings: HeadSettings, model_config: Any) -> dict[str, Any]:
    return {"id2label": {int(k): str(v) for k, v in model_config.id2label.items()}}


def _classifier_manifest(settings: HeadSettings, model_config: Any) -> dict[str, Any]:
    return {**_labels_manifest(settings, model_config), "activation": settings.activation}


TASK_SPECS: dict[Task, TaskSpec] = {
    "embed": TaskSpec(
        task="embed",
        model_class="AutoModel",
        output_names=_embedding_outputs,
        output_axes={"embedding": {0: "batch"}, "token_embeddings": _BATCH_SEQUENCE},
        comparisons={
            "embedding": comparisons.vectors,
            "token_embeddings": comparisons.at_valid_positions(comparisons.vectors),
        },
        build_head=_build_embedding_head,
        manifest_fields=_embedding_manifest,
        reads_layers=True,
    ),
    "fill-mask": TaskSpec(
        task="fill-mask",
        model_class="AutoModelForMaskedLM",
        output_names=lambda settings: ("mask_positions", "top_scores", "top_ids"),
        output_axes={"mask_positions": {0: "masks"}, "top_scores": {0: "masks"}, "top_ids": {0: "masks"}},
        comparisons={
            "mask_positions": comparisons.exact,
            "top_scores": comparisons.elementwise,
            "top_ids": comparisons.tied_ranking("top_scores"),
        },
        build_head=_build_fill_mask_head,
        manifest_fields=_fill_mask_manifest,
        head_weights=HeadWeights(lambda architecture: architecture.masked_lm_head_prefix, "a masked-LM"),
        masked_inputs=True,
    ),
    "classify": TaskSpec(
        task="classify",
        model_class="AutoModelForSequenceClassification",
        output_names=lambda settings: ("probs", "logits"),
        output_axes={"probs": {0: "batch"}, "logits": {0: "batch"}},
        comparisons={"probs": comparisons.probabilities, "logits": comparisons.probabilities},
        build_head=_build_classifier_head,
        manifest_fields=_classifier_manifest,
        head_weights=HeadWeights(
            lambda architecture: architecture.classifier_head_prefix, "a fine-tuned sequence classifier"
        ),
    ),
    "token-classify": TaskSpec(
        task="token-classify",
        model_class="AutoModelForTokenClassification",
        output_names=lambda settings: ("token_probs",),
        output_axes={"token_probs": _BATCH_SEQUENCE},
        comparisons={"token_probs": comparisons.at_valid_positions(comparisons.probabilities)},
        build_head=_build_token_classifier_head,
        manifest_fields=_labels_manifest,  # the export adds subword_prefix, a fact of the tokenizer
        head_weights=HeadWeights(
            lambda architecture: architecture.token_classifier_head_prefix, "a fine-tuned token classifier"
        ),
    ),
}


def recorded_settings(manifest: Manifest) -> HeadSettings:
    """The head settings an export recorded in its manifest; what its task does not record keeps the defaults."""
    defaults = HeadSettings()
    return HeadSettings(
        pooling=manifest.pooling or defaults.pooling,
        normalize=manifest.normalize,
        layers=manifest.layers or defaults.layers,
        token_embeddings=manifest.token_embeddings,
        top_k=manifest.top_k or defaults.top_k,
        mask_token_id=manifest.special_tokens.mask,
        activation=manifest.activation or defaults.activation,  # exports before the field had softmax
    )


def dynamic_axes(
    spec: TaskSpec, settings: HeadSettings, input_names: tuple[str, ...] = INPUT_NAMES
) -> dict[str, dict[int, str]]:
    axes = {name: dict(_BATCH_SEQUENCE) for name in input_names}
    axes.update({name: spec.output_axes[name] for name in spec.output_names(settings)})
    return axes
