"""The manifest is the contract with the worker: it round-trips through JSON exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.modeldir.manifest import MANIFEST_NAME, Manifest, SpecialTokens, read_manifest, write_manifest


def a_manifest() -> Manifest:
    return Manifest(
        task="classify",
        source="/models/sentiment",
        max_length=128,
        special_tokens=SpecialTokens(cls=101, sep=102, pad=0, mask=103, unk=100),
        inputs=("input_ids", "attention_mask", "token_type_ids"),
        outputs=("probs",),
        opset=17,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        validation={"passed": True, "problems": []},
    )


def test_manifest_round_trips_with_integer_label_ids(tmp_path: Path) -> None:
    manifest = a_manifest()
    write_manifest(tmp_path, manifest)

    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path).id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert [path.name for path in tmp_path.iterdir()] == [MANIFEST_NAME], "no temporary file left behind"
    assert json.loads((tmp_path / MANIFEST_NAME).read_text(encoding="utf-8"))["id2label"] == {
        "0": "negative",
        "1": "neutral",
        "2": "positive",
    }


def test_manifest_of_another_format_version_is_refused() -> None:
    data = json.loads(a_manifest().to_json())
    data["format_version"] = 2
    with pytest.raises(ValueError, match="format_version 2"):
        Manifest.from_json(json.dumps(data))


def test_validated_follows_the_report() -> None:
    assert a_manifest().validated
    failed = Manifest(**{**a_manifest().__dict__, "validation": {"passed": False}})
    assert not failed.validated
