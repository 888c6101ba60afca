"""Per-architecture facts the exporter needs: where the encoder and the heads live, which
inputs the model takes, how it numbers positions, and what onnxruntime's optimizer fuses.

One small spec per ``config.model_type``. Adding a BERT-family architecture means
adding a spec here, and its tiny checkpoints in ``tests/exporter/family_checkpoints.py``
(``tests/exporter/test_tasks.py`` fails when a registered family has no test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exporter.errors import SourceError

if TYPE_CHECKING:
    from torch import nn

Prefixes = tuple[str, ...]  # state-dict prefixes of a head (str.startswith takes the tuple)


def _uses_token_types(config: Any) -> bool:
    return True


def _never_token_types(config: Any) -> bool:
    return False


def _deberta_uses_token_types(config: Any) -> bool:
    # DeBERTa-v3 checkpoints have type_vocab_size 0: the embeddings ignore token_type_ids.
    return int(getattr(config, "type_vocab_size", 0) or 0) > 0


def _absolute_positions(config: Any) -> int:
    return int(config.max_position_embeddings)


def _positions_after_padding_idx(config: Any) -> int:
    # fairseq numbering (RoBERTa, XLM-R, CamemBERT, MPNet): position ids start at
    # padding_idx + 1, so 514 position embeddings hold 512 tokens; the 513th row breaks.
    return int(config.max_position_embeddings) - int(config.pad_token_id) - 1


def _relative_positions(config: Any) -> int:
    # DeBERTa-v2/v3 (relative attention, position_biased_input false) and ModernBERT
    # (rotary) have no absolute table to overflow; they were trained up to max_position_embeddings.
    return int(config.max_position_embeddings)


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the exporter must know about one ``model_type``.

    ``masked_lm_head_attributes`` are the modules of a ``*ForMaskedLM`` that map the
    encoder's last hidden state to vocabulary logits, applied in turn (DistilBERT's
    head is four of them); ``masked_lm_head`` builds that path for a loaded model.
    Prefixes are state-dict prefixes, used to refuse checkpoints whose head weights
    are missing (and would be random).
    """

    model_type: str
    encoder_attribute: str  # the base model inside a *ForMaskedLM / *ForSequenceClassification
    masked_lm_head_attributes: tuple[str, ...]
    masked_lm_head_prefix: Prefixes
    classifier_head_prefix: Prefixes
    token_classifier_head_prefix: Prefixes  # of *ForTokenClassification
    pooler_prefix: str | None  # of the base model (AutoModel); None: the family has no pooler
    # Whether the model reads token_type_ids. The exported graph takes exactly the inputs
    # the model reads: input_ids and attention_mask, plus token_type_ids where this is true.
    uses_token_type_ids: Callable[[Any], bool]
    # The longest sequence the position scheme holds, from the model's config.
    usable_positions: Callable[[Any], int]
    # onnxruntime.transformers.optimizer (model_type "bert", the only encoder type it has) fuses
    # attention in every layer, unless this says why it cannot; layer norms and GELU fuse anyway.
    not_fusable: str | None = None
    # Hub checkpoints people run through batch jobs (README examples; never downloaded by tests).
    examples: tuple[str, ...] = ()
    masked_lm_head_builder: Callable[[Any], nn.Module] | None = None

    @property
    def masked_lm_head_attribute(self) -> str:
        """The first module of the masked-LM head (the whole head for BERT: ``cls``)."""
        return self.masked_lm_head_attributes[0]

    def masked_lm_head(self, masked_lm: Any) -> nn.Module:
        """The module mapping a ``*ForMaskedLM``'s last hidden states to its vocabulary logits."""
        if self.masked_lm_head_builder is not None:
            return self.masked_lm_head_builder(masked_lm)
        from torch import nn

        modules = [getattr(masked_lm, name) for name in self.masked_lm_head_attributes]
        return modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def input_names(self, config: Any) -> tuple[str, ...]:
        """The graph's inputs, in order."""
        if self.uses_token_type_ids(config):
            return ("input_ids", "attention_mask", "token_type_ids")
        return ("input_ids", "attention_mask")

    def max_length(self, config: Any) -> int:
        return self.usable_positions(config)


def _deberta_masked_lm_head(masked_lm: Any) -> nn.Module:
    """DeBERTa-v2's non-legacy head takes the word embeddings as a second argument."""
    if getattr(masked_lm, "legacy", True):
        return masked_lm.cls  # type: ignore[no-any-return]
    from torch import nn

    class _WithWordEmbeddings(nn.Module):
        def __init__(self, head: Any, word_embeddings: Any) -> None:
            super().__init__()
            self.head, self.word_embeddings = head, word_embeddings

        def forward(self, hidden: Any) -> Any:
            return self.head(hidden, self.word_embeddings)

    return _WithWordEmbeddings(masked_lm.lm_predictions, masked_lm.deberta.embeddings.word_embeddings)


def _roberta_like(model_type: str, examples: tuple[str, ...]) -> ArchitectureSpec:
    return ArchitectureSpec(
        model_type=model_type,
        encoder_attribute="roberta",
        masked_lm_head_attributes=("lm_head",),
        masked_lm_head_prefix=("lm_head.",),
        classifier_head_prefix=("classifier.",),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix="pooler.",
        # The tokenizers of the family emit no token types (model_input_names), and
        # RoBERTa checkpoints hold one type embedding: a pair's type ids 1 would index past it.
        uses_token_type_ids=_never_token_types,
        usable_positions=_positions_after_padding_idx,
        examples=examples,
    )


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": ArchitectureSpec(
        model_type="bert",
        encoder_attribute="bert",
        masked_lm_head_attributes=("cls",),
        masked_lm_head_prefix=("cls.",),
        classifier_head_prefix=("classifier.",),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix="pooler.",
        uses_token_type_ids=_uses_token_types,
        usable_positions=_absolute_positions,
        examples=("sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5", "bert-base-uncased",
                  "cross-encoder/ms-marco-MiniLM-L-6-v2"),
    ),
    "roberta": _roberta_like(
        "roberta",
        ("roberta-base", "cardiffnlp/twitter-roberta-base-sentiment-latest", "sentence-transformers/all-distilroberta-v1"),
    ),
    "xlm-roberta": _roberta_like(
        "xlm-roberta",
        ("intfloat/multilingual-e5-base", "BAAI/bge-m3", "xlm-roberta-base", "BAAI/bge-reranker-v2-m3"),
    ),
    "camembert": _roberta_like("camembert", ("camembert-base", "dangvantuan/sentence-camembert-base")),
    "distilbert": ArchitectureSpec(
        model_type="distilbert",
        encoder_attribute="distilbert",
        masked_lm_head_attributes=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        masked_lm_head_prefix=("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
        classifier_head_prefix=("pre_classifier.", "classifier."),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix=None,
        uses_token_type_ids=_never_token_types,
        usable_positions=_absolute_positions,
        examples=("distilbert-base-uncased-finetuned-sst-2-english", "distilbert-base-uncased",
                  "sentence-transformers/msmarco-distilbert-base-v4"),
    ),
    "electra": ArchitectureSpec(
        model_type="electra",
        encoder_attribute="electra",
        masked_lm_head_attributes=("generator_predictions", "generator_lm_head"),
        masked_lm_head_prefix=("generator_predictions.", "generator_lm_head."),
        classifier_head_prefix=("classifier.",),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix=None,
        uses_token_type_ids=_uses_token_types,
        usable_positions=_absolute_positions,
        examples=("google/electra-base-discriminator", "google/electra-small-generator",
                  "cross-encoder/ms-marco-electra-base"),
    ),
    "deberta-v2": ArchitectureSpec(
        model_type="deberta-v2",
        encoder_attribute="deberta",
        masked_lm_head_attributes=("lm_predictions",),
        masked_lm_head_prefix=("lm_predictions.", "cls."),
        classifier_head_prefix=("pooler.", "classifier."),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix=None,
        uses_token_type_ids=_deberta_uses_token_types,
        usable_positions=_relative_positions,
        not_fusable=("disentangled attention (content-to-position and position-to-content terms) matches no "
                     "attention fusion of onnxruntime's transformer optimizer"),
        examples=("microsoft/deberta-v3-base", "MoritzLaurer/DeBERTa-v3-base-mnli-fever-anli",
                  "mixedbread-ai/mxbai-rerank-base-v1"),
        masked_lm_head_builder=_deberta_masked_lm_head,
    ),
    "mpnet": ArchitectureSpec(
        model_type="mpnet",
        encoder_attribute="mpnet",
        masked_lm_head_attributes=("lm_head",),
        masked_lm_head_prefix=("lm_head.",),
        classifier_head_prefix=("classifier.",),
        token_classifier_head_prefix=("classifier.",),
        pooler_prefix="pooler.",
        uses_token_type_ids=_never_token_types,
        usable_positions=_positions_after_padding_idx,
        not_fusable=("the relative position bias added to every layer's attention scores matches no attention "
                     "fusion of onnxruntime's transformer optimizer"),
        examples=("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/multi-qa-mpnet-base-dot-v1",
                  "microsoft/mpnet-base"),
    ),
    "modernbert": ArchitectureSpec(
        model_type="modernbert",
        encoder_attribute="model",
        masked_lm_head_attributes=("head", "decoder"),
        masked_lm_head_prefix=("head.", "decoder."),
        classifier_head_prefix=("head.", "classifier."),
        token_classifier_head_prefix=("head.", "classifier."),
        pooler_prefix=None,
        uses_token_type_ids=_never_token_types,
        usable_positions=_relative_positions,
        not_fusable=("rotary position embeddings on queries and keys, and sliding-window local attention, match no "
                     "attention fusion of onnxruntime's transformer optimizer"),
        examples=("answerdotai/ModernBERT-base", "nomic-ai/modernbert-embed-base", "Alibaba-NLP/gte-modernbert-base"),
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
