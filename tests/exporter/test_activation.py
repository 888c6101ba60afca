"""The classify activation follows the checkpoint as transformers' pipeline and CrossEncoder do
(exporter/activation.py). The numbers of each choice are checked end to end in test_classify_heads.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.activation import ActivationChoice, choose_activation, declared_activation
from exporter.errors import ExportError

SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "declared", "expected"),
    [
        (3, None, None, "softmax"),
        (2, "single_label_classification", None, "softmax"),
        (3, "multi_label_classification", None, "sigmoid"),
        (1, "multi_label_classification", IDENTITY, "sigmoid"),
        (1, None, None, "sigmoid"),  # the pipeline's and CrossEncoder's default for one label
        (1, None, SIGMOID, "sigmoid"),
        (1, None, IDENTITY, "none"),  # a CrossEncoder saved with activation_fn=Identity
        (1, "regression", None, "none"),
        (1, "regression", SIGMOID, "sigmoid"),  # CrossEncoder.predict applies what it declares
        (4, "regression", None, "none"),
        (3, None, IDENTITY, "softmax"),  # CrossEncoder's default for several labels says nothing
        (3, None, SIGMOID, "sigmoid"),
    ],
)
def test_auto_follows_the_checkpoint(num_labels: int, problem_type: str | None, declared: str | None, expected: str) -> None:
    assert choose_activation(num_labels, problem_type, declared).activation == expected


@pytest.mark.parametrize("requested", ["softmax", "sigmoid", "none"])
def test_an_explicit_activation_overrides_the_checkpoint(requested: ActivationChoice) -> None:
    decision = choose_activation(3, "multi_label_classification", IDENTITY, requested)
    assert decision.activation == requested
    assert requested in decision.reason


def test_softmax_over_a_single_logit_is_refused() -> None:
    with pytest.raises(ExportError, match="always 1.0"):
        choose_activation(1, None, None, "softmax")
    with pytest.raises(ExportError, match="always 1.0"):
        choose_activation(1, None, "torch.nn.modules.activation.Softmax")


def test_an_activation_bertbatch_cannot_build_is_refused_naming_it() -> None:
    with pytest.raises(ExportError, match="torch.nn.modules.activation.Tanh.*--activation"):
        choose_activation(1, None, "torch.nn.modules.activation.Tanh")
    with pytest.raises(ExportError, match="my_package.Scaled"):
        choose_activation(1, None, "my_package.Scaled")


def test_declared_activation_is_read_where_crossencoder_reads_it(tmp_path: Path) -> None:
    current, older, oldest, none = (tmp_path / name for name in ("current", "older", "oldest", "none"))
    for folder in (current, older, oldest, none):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (current / "config_sentence_transformers.json").write_text(json.dumps({"activation_fn": IDENTITY}))
    (current / "config.json").write_text(json.dumps({"sentence_transformers": {"activation_fn": SIGMOID}}))
    (older / "config.json").write_text(json.dumps({"sentence_transformers": {"activation_fn": IDENTITY, "version": "4.0"}}))
    (oldest / "config.json").write_text(json.dumps({"sbert_ce_default_activation_function": IDENTITY}))

    assert declared_activation([current]) == IDENTITY  # config_sentence_transformers.json comes first
    assert declared_activation([older]) == IDENTITY
    assert declared_activation([oldest]) == IDENTITY
    assert declared_activation([none]) is None
