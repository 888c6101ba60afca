"""The onnxruntime session: IOBinding runs, device choice, CUDA-only exports."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from exporter.export import ExportResult
from worker.batching import iter_padded_batches
from worker.cli import app
from worker.errors import DeviceUnavailable
from worker.exit_codes import ExitCode
from worker.modeldir.manifest import MODEL_FILE, read_manifest, write_manifest
from worker.modeldir.session import cuda_usable
from worker.runner import Runner, cuda_provider_options, open_model_dir
from worker.tokenize import load_tokenizer, tokenize_window

TEXTS = ["i love kathmandu", "", "the river [MASK] past old stone houses", "a [MASK] and a [MASK] in one longer row of text"]


@pytest.mark.parametrize("export_fixture", ["tiny_embed_export", "tiny_fill_mask_export", "tiny_decisive_classify_export"])
def test_bound_run_equals_a_plain_session_run(export_fixture: str, request: pytest.FixtureRequest) -> None:
    """The IOBinding path returns exactly what ``session.run`` returns, for float and integer outputs."""
    export: ExportResult = request.getfixturevalue(export_fixture)
    model_dir = open_model_dir(export.directory)
    runner = Runner(model_dir, "cpu")
    tokens = tokenize_window(load_tokenizer(model_dir.tokenizer_file, model_dir.manifest.max_length), TEXTS)
    batches = list(iter_padded_batches(tokens.token_ids, tokens.type_ids, model_dir.manifest.special_tokens.pad, 3))
    assert len(batches) == 2  # several shapes through one session
    for batch in batches:
        bound = runner.run(batch)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "token_type_ids": batch.token_type_ids}
        plain = runner.session.run(runner.output_names, feeds)
        assert list(bound) == list(model_dir.manifest.outputs)
        for name, expected in zip(runner.output_names, plain):
            assert bound[name].dtype == expected.dtype and bound[name].shape == expected.shape
            np.testing.assert_array_equal(bound[name], expected)


def test_cuda_options_bound_the_arena_and_keep_fp32_in_fp32(tiny_embed_export: ExportResult) -> None:
    manifest = tiny_embed_export.manifest
    assert cuda_provider_options(manifest) == {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
    assert cuda_provider_options(replace(manifest, precision="fp16"))["use_tf32"] == "1"


@pytest.fixture
def packed_manifest_dir(tiny_embed_export: ExportResult, tmp_path: Path) -> Path:
    """A model directory whose manifest says packed attention (CUDA only)."""
    directory = tmp_path / "packed"
    shutil.copytree(tiny_embed_export.directory, directory)
    write_manifest(directory, replace(read_manifest(directory), attention="packed"))
    return directory


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_cuda_only_export_never_runs_on_cpu(packed_manifest_dir: Path, device: str, tmp_path: Path) -> None:
    if cuda_usable() and device == "auto":
        pytest.skip("CUDA works here, so auto picks it")
    with pytest.raises(DeviceUnavailable, match="packed attention"):
        Runner(open_model_dir(packed_manifest_dir), device)  # type: ignore[arg-type]
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["one row"]}), data)
    output = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--model", str(packed_manifest_dir), "--input", str(data), "--output", str(output),
                                      "--text-column", "text", "--device", device])
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6, result.output
    assert "CUDA only" in result.output
    assert not output.exists() or not any(output.glob("*.parquet"))


def test_validate_on_cuda_without_cuda_exits_6(tiny_embed_export: ExportResult) -> None:
    if cuda_usable():
        pytest.skip("CUDA works here")
    result = CliRunner().invoke(app, ["validate", str(tiny_embed_export.directory), "--device", "cuda"])
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6, result.output
    assert (tiny_embed_export.directory / MODEL_FILE).is_file()
