"""Per-architecture facts the exporter needs: where the encoder and the heads live.

One small spec per ``config.model_type``. Adding a BERT-family architecture means
adding a spec here, and its test in ``tests/exporter/test_architectures.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import SourceError


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    encoder_attribute: str  # the base model inside a *ForMaskedLM / *ForSequenceClassification
    masked_lm_head_attribute: str  # maps hidden states to vocabulary logits
    masked_lm_head_prefix: str  # state-dict prefix of that head, to spot missing weights
    classifier_head_prefix: str
    pooler_prefix: str | None


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": ArchitectureSpec(
        model_type="bert",
        encoder_attribute="bert",
        masked_lm_head_attribute="cls",
        masked_lm_head_prefix="cls.",
        classifier_head_prefix="classifier.",
        pooler_prefix="pooler.",
    ),
}


def architecture_for(model_type: str, source: str) -> ArchitectureSpec:
    """Return the spec of ``model_type`` or explain which ones are supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise SourceError(
            f"{source}: model_type {model_type!r} is not supported; bertbatch exports {supported}"
        ) from None
