"""What the exporter must refuse, with an error that says why, before writing anything:
checkpoints (SourceError), an occupied output (OutputExists), impossible option combinations (ExportError)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.errors import ExportError, SourceError
from exporter.export import ExportConfig, OutputExists, export_model
from exporter.source import resolve_source
from worker.exit_codes import ExitCode
from worker.modeldir.manifest import read_manifest


def export(source: str | Path, task: str, out: Path, **options: Any) -> Path:
    config = ExportConfig(source=str(source), task=task, out=out, **options)  # type: ignore[arg-type]
    return export_model(config, log=lambda line: None).directory


def test_a_base_model_is_not_a_masked_lm(tmp_path: Path, tiny_base_checkpoint: Path) -> None:
    with pytest.raises(SourceError, match=r"is not a masked-LM checkpoint: weights cls\.predictions\.") as raised:
        export(tiny_base_checkpoint, "fill-mask", tmp_path / "model")
    assert raised.value.exit_code == ExitCode.MODEL_ERROR
    assert list(tmp_path.iterdir()) == []


def test_a_base_model_is_not_a_classifier(tmp_path: Path, tiny_base_checkpoint: Path) -> None:
    with pytest.raises(SourceError, match=r"is not a fine-tuned sequence classifier checkpoint: weights classifier\."):
        export(tiny_base_checkpoint, "classify", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_masked_lm_is_not_a_classifier(tmp_path: Path, tiny_mlm_checkpoint: Path) -> None:
    with pytest.raises(SourceError, match="classifier"):
        export(tiny_mlm_checkpoint, "classify", tmp_path / "model")


def test_a_non_bert_model_type_is_refused(tmp_path: Path) -> None:
    import transformers

    checkpoint = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16).save_pretrained(checkpoint)

    with pytest.raises(SourceError, match=r"model_type 'gpt2' is not supported; bertbatch exports bert"):
        export(checkpoint, "embed", tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.usefixtures("offline_hub")
def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(SourceError, match="not a local directory"):
        export(missing, "embed", tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.usefixtures("offline_hub")
def test_a_hub_id_that_is_not_cached_is_refused_offline(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"bertbatch-tests/no-such-model: not a local directory.*Offline"):
        export("bertbatch-tests/no-such-model", "embed", tmp_path / "model")


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(SourceError, match="not a directory"):
        resolve_source(str(file))


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_sentence_transformers_modules_beyond_pooling_and_normalize_are_refused(tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(SourceError, match="'sentence_transformers.models.Dense' is not supported"):
        resolve_source(str(tmp_path))


@pytest.mark.parametrize("layers", ["sum-last-four", "concat-last-four"])
def test_last_four_layers_need_four_encoder_layers(layers: str, tmp_path: Path, tiny_base_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="at least 4 encoder layers; this checkpoint has 2"):
        export(tiny_base_checkpoint, "embed", tmp_path / "model", layers=layers)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layers", ["second-to-last", "sum-last-four", "concat-last-four"])
def test_pooler_cannot_combine_with_layers(layers: str, tmp_path: Path, tiny_four_layer_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="--pooling pooler"):
        export(tiny_four_layer_checkpoint, "embed", tmp_path / "model", pooling="pooler", layers=layers)
    assert list(tmp_path.iterdir()) == [], "nothing is written for a refused export"


def test_existing_output_is_refused_without_overwrite(tmp_path: Path, tiny_base_checkpoint: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("not ours", encoding="utf-8")

    with pytest.raises(OutputExists, match="--overwrite"):
        export(tiny_base_checkpoint, "embed", out)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]

    assert export(tiny_base_checkpoint, "embed", out, overwrite=True) == out
    assert not (out / "keep.txt").exists()
    assert read_manifest(out).validated

