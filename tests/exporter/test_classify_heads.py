"""Classify exports whose scores mean what the checkpoint means (issue 11): a CrossEncoder reranker
against ``CrossEncoder.predict``, a multi-label head against the sigmoid of PyTorch's logits, a regression
head against its raw output, ``--activation`` overrides, and the activation kept float32 under ``--fp16``.

The bug these guard: a softmax over a single logit gave every row the score 1.0, and validation
passed because its reference applied the same softmax.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_export import encode_padded, run_onnx

from exporter.errors import ExportError, SourceError
from exporter.export import ExportConfig, ExportResult, export_model
from worker.modeldir.manifest import MODEL_FILE, read_manifest

PAIRS = [
    ("what is the capital of nepal?", "Kathmandu is the capital of Nepal."),
    ("what is the capital of nepal?", "The quick brown fox jumps over the lazy dog."),
    ("how are embeddings pooled?", "By averaging the token vectors of the real tokens, ignoring padding."),
    ("is it raining?", "No."),
    ("short", "a much longer second segment that goes on for a while to make the pair uneven in length"),
    ("zürich or 東京?", "emoji 🚀 and numbers 3.14159"),
]
TEXTS = [
    "i love kathmandu",
    "Sinan loves a beautiful day",
    "A",
    "The quick brown fox jumps over the lazy dog, and then naps in the afternoon sun for a while.",
    "Zürich, Malmö and 東京",
    "you are a terrible, terrible person and I will find you",
]


def export(tmp_path: Path, checkpoint: Path, task: str = "classify", **options: Any) -> ExportResult:
    config = ExportConfig(source=str(checkpoint), task=task, out=tmp_path / "model", **options)  # type: ignore[arg-type]
    return export_model(config, log=lambda line: None)


def torch_logits(checkpoint: Path, items: list[Any]) -> np.ndarray:
    """Logits of the checkpoint, one row at a time (no padding shared with the export)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    rows = []
    for item in items:
        encoded = tokenizer(*([item] if isinstance(item, str) else item), return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**encoded).logits[0].numpy())
    return np.stack(rows)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def test_a_cross_encoder_scores_its_pairs_as_crossencoder_predict(tmp_path: Path, tiny_cross_encoder_checkpoint: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    result = export(tmp_path, tiny_cross_encoder_checkpoint)
    assert (result.manifest.activation, result.manifest.outputs) == ("sigmoid", ("probs", "logits"))
    assert read_manifest(result.directory).activation == "sigmoid"
    assert not result.manifest.multi_label
    assert {"probs", "logits"} <= set(result.report.outputs)  # validation compares both

    model = CrossEncoder(str(tiny_cross_encoder_checkpoint), device="cpu")
    got = run_onnx(result, encode_padded(result.directory, PAIRS))
    np.testing.assert_allclose(got["probs"][:, 0], model.predict(PAIRS), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["logits"][:, 0], model.predict(PAIRS, activation_fn=torch.nn.Identity()), rtol=0, atol=1e-4)
    assert len({round(float(score), 3) for score in got["probs"][:, 0]}) == len(PAIRS), "one score per pair, not 1.0 for all"


def test_a_cross_encoder_saved_with_identity_gives_raw_scores(tmp_path: Path, tiny_cross_encoder_checkpoint: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    directory = tmp_path / "identity-cross-encoder"
    CrossEncoder(str(tiny_cross_encoder_checkpoint), device="cpu", activation_fn=torch.nn.Identity()).save(str(directory))
    assert "Identity" in json.loads((directory / "config_sentence_transformers.json").read_text())["activation_fn"]

    result = export(tmp_path, directory)
    assert result.manifest.activation == "none"
    got = run_onnx(result, encode_padded(result.directory, PAIRS))
    expected = CrossEncoder(str(directory), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(got["probs"][:, 0], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got["probs"], got["logits"])
    assert np.abs(expected - sigmoid(expected)).max() > 0.05, "raw scores, not their sigmoid"


def test_an_older_config_json_activation_is_honoured(tmp_path: Path, tiny_cross_encoder_checkpoint: Path) -> None:
    # sentence-transformers 4/5 kept activation_fn in config.json's "sentence_transformers" block.
    directory = tmp_path / "older"
    shutil.copytree(tiny_cross_encoder_checkpoint, directory)
    (directory / "config_sentence_transformers.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity", "version": "4.0.1"}
    (directory / "config.json").write_text(json.dumps(config))

    assert export(tmp_path, directory).manifest.activation == "none"


def test_multi_label_is_one_sigmoid_per_label(tmp_path: Path, tiny_multi_label_checkpoint: Path) -> None:
    result = export(tmp_path, tiny_multi_label_checkpoint)
    assert result.manifest.activation == "sigmoid" and result.manifest.multi_label

    got = run_onnx(result, encode_padded(result.directory, TEXTS))
    logits = torch_logits(tiny_multi_label_checkpoint, TEXTS)
    np.testing.assert_allclose(got["logits"], logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["probs"], sigmoid(logits), rtol=0, atol=1e-5)
    # Independent labels: rows do not sum to one, and some rows have several labels above 0.5.
    assert not np.allclose(got["probs"].sum(axis=1), 1.0, atol=0.05)
    assert ((got["probs"] >= 0.5).sum(axis=1) >= 2).any()


def test_a_regression_head_gives_its_raw_score(tmp_path: Path, tiny_regression_checkpoint: Path) -> None:
    result = export(tmp_path, tiny_regression_checkpoint)
    assert result.manifest.activation == "none"

    got = run_onnx(result, encode_padded(result.directory, PAIRS))
    np.testing.assert_allclose(got["probs"], torch_logits(tiny_regression_checkpoint, PAIRS), rtol=0, atol=1e-4)
    assert len({round(float(score), 3) for score in got["probs"][:, 0]}) == len(PAIRS)


def test_activation_overrides_the_checkpoint_and_is_recorded(tmp_path: Path, tiny_decisive_classifier_checkpoint: Path) -> None:
    result = export(tmp_path, tiny_decisive_classifier_checkpoint, activation="sigmoid")
    assert read_manifest(result.directory).activation == "sigmoid"
    assert result.manifest.multi_label

    got = run_onnx(result, encode_padded(result.directory, TEXTS))
    np.testing.assert_allclose(got["probs"], sigmoid(torch_logits(tiny_decisive_classifier_checkpoint, TEXTS)), atol=1e-5)


def test_softmax_over_a_single_logit_is_refused_and_nothing_is_written(tmp_path: Path, tiny_regression_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="always 1.0"):
        export(tmp_path, tiny_regression_checkpoint, activation="softmax")
    assert not (tmp_path / "model").exists()


def test_activation_applies_to_classify_only(tmp_path: Path, tiny_base_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="--activation applies to --task classify"):
        export(tmp_path, tiny_base_checkpoint, task="embed", activation="sigmoid")


def test_fp16_keeps_the_activation_float32(tmp_path: Path, tiny_cross_encoder_checkpoint: Path) -> None:
    import onnx
    from onnx import TensorProto
    from sentence_transformers import CrossEncoder

    result = export(tmp_path, tiny_cross_encoder_checkpoint, fp16=True)
    assert result.report.passed and result.manifest.activation == "sigmoid"

    graph = onnx.load(str(result.directory / MODEL_FILE)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.output, *graph.input]}
    sigmoids = [node for node in graph.node if node.op_type == "Sigmoid"]
    assert sigmoids and all(types.get(node.input[0]) == TensorProto.FLOAT for node in sigmoids)

    got = run_onnx(result, encode_padded(result.directory, PAIRS))["probs"][:, 0]
    np.testing.assert_allclose(got, CrossEncoder(str(tiny_cross_encoder_checkpoint), device="cpu").predict(PAIRS), atol=1e-2)
    assert len(set(got.tolist())) == len(PAIRS), "no half-precision ties"


def test_a_sequence_classifier_is_not_exported_as_a_token_classifier(
    tmp_path: Path, tiny_decisive_classifier_checkpoint: Path, tiny_token_classifier_checkpoint: Path
) -> None:
    # Both heads are one Linear named `classifier`: the weights would load either way.
    with pytest.raises(SourceError, match="BertForSequenceClassification.*--task classify"):
        export(tmp_path, tiny_decisive_classifier_checkpoint, task="token-classify")
    with pytest.raises(SourceError, match="BertForTokenClassification.*--task token-classify"):
        export(tmp_path, tiny_token_classifier_checkpoint, task="classify")
