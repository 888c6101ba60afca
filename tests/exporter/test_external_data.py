"""Graphs past protobuf's 2 GB limit: weights as ONNX external data inside the model directory.

A real 2 GB checkpoint is too big for CI, so a tiny one is exported with external data
forced (``--external-data``); the path is the same one a large graph takes automatically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_families import _Cache, assert_matches_pytorch, family_checkpoint, family_export

from exporter.onnx_files import lay_out_export
from worker.errors import ModelDirError
from worker.jobstate import model_fingerprint
from worker.modeldir.manifest import MODEL_DATA_FILE, MODEL_FILE
from worker.runner import open_model_dir


@pytest.fixture(scope="module")
def external_cache(tmp_path_factory: pytest.TempPathFactory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("external"))


@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"quantize": "int8"}], ids=["plain", "optimize", "int8"])
def test_external_data_export_loads_in_the_worker_and_matches_pytorch(
    options: dict[str, object], external_cache: _Cache, tmp_path: Path
) -> None:
    result = family_export(external_cache, "roberta", "embed", external_data=True, **options)
    directory = result.directory

    assert result.manifest.model_data_file == MODEL_DATA_FILE
    assert (directory / MODEL_DATA_FILE).stat().st_size > (directory / MODEL_FILE).stat().st_size
    graph = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the weights live in the data file"
    assert {entry.value for t in external for entry in t.external_data if entry.key == "location"} == {MODEL_DATA_FILE}
    assert sorted(p.name for p in directory.iterdir() if p.suffix in (".onnx", ".data")) == [MODEL_FILE, MODEL_DATA_FILE]
    assert result.report.passed
    if options:
        assert result.manifest.optimized
    else:
        assert_matches_pytorch(result, family_checkpoint(external_cache, "roberta", "embed"), "embed", tmp_path)


def test_the_job_identity_covers_the_data_file(external_cache: _Cache, tmp_path: Path) -> None:
    import shutil

    result = family_export(external_cache, "roberta", "embed", external_data=True)
    copy = tmp_path / "model"
    shutil.copytree(result.directory, copy)
    before = model_fingerprint(open_model_dir(copy))
    data = copy / MODEL_DATA_FILE
    weights = bytearray(data.read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    data.write_bytes(bytes(weights))
    assert model_fingerprint(open_model_dir(copy)) != before

    data.unlink()
    with pytest.raises(ModelDirError, match=rf"{MODEL_DATA_FILE} is missing"):
        open_model_dir(copy)


def test_per_tensor_external_files_are_gathered_into_one(tmp_path: Path) -> None:
    # What torch.onnx.export writes for a graph past 2 GB: one file per tensor beside model.onnx.
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), name="weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    path = tmp_path / MODEL_FILE
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, "weight"]

    assert lay_out_export(path, external=False) is False  # small: back inline
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE]
    assert lay_out_export(path, external=True) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, MODEL_DATA_FILE]
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(weight))


def test_the_cli_writes_external_data_when_asked(external_cache: _Cache, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app
    from worker.modeldir.manifest import read_manifest

    checkpoint = family_checkpoint(external_cache, "roberta", "embed")
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--task", "embed", "--out", str(out), "--external-data"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out).model_data_file == MODEL_DATA_FILE and (out / MODEL_DATA_FILE).is_file()
