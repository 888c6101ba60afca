"""The `bertbatch` command line end to end: results against PyTorch, and the documented exit codes.

Scripts rely on the exit codes (worker/exit_codes.py) and on one-line error
messages that name what is wrong, so both are asserted exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from conftest import LABELS, TorchReference, minilm_dir
from exporter.export import ExportResult
from worker.cli import app
from worker.exit_codes import ExitCode
from worker.jobstate import OutputLock
from worker.modeldir.manifest import MANIFEST_NAME, TASKS, read_manifest

TEXTS: list[str | None] = ["i love kathmandu", None, "", "the river [MASK] past old stone houses", "Sinan loves a beautiful [MASK] and a [MASK]"]

# Per task: the export fixture, the reference fixture and the result columns.
TASK_CASES = {
    "embed": ("tiny_embed_export", "embed_reference", ["embedding", "error"]),
    "classify": ("tiny_decisive_classify_export", "classify_reference", ["label", "label_id", "score", "probs", "logits", "error"]),
    "fill-mask": ("tiny_fill_mask_export", "fill_mask_reference", ["fills", "error"]),
    "token-classify": ("tiny_token_classify_export", "token_classify_reference", ["entities", "error"]),
}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def write_input(path: Path, texts: Sequence[str | None] = TEXTS) -> Path:
    table = pa.table(
        {
            "doc_id": pa.array([f"d{i}" for i in range(len(texts))]),
            "text": pa.array(texts, pa.string()),
            "year": pa.array([2000 + i for i in range(len(texts))], pa.int16()),
        }
    )
    pq.write_table(table, path, row_group_size=2)
    return path


def run_args(model: Path, source: Path, output: Path, *extra: object) -> list[object]:
    return ["run", "--model", model, "--input", source, "--output", output, "--text-column", "text", *extra]


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_every_task_has_a_cli_test() -> None:
    assert set(TASK_CASES) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASK_CASES))
def test_run_writes_the_tasks_columns_with_pytorch_values(tmp_path: Path, request: pytest.FixtureRequest, task: str) -> None:
    export_fixture, reference_fixture, result_columns = TASK_CASES[task]
    export: ExportResult = request.getfixturevalue(export_fixture)
    reference: Any = request.getfixturevalue(reference_fixture)
    output = tmp_path / "out"
    result = invoke(*run_args(export.directory, write_input(tmp_path / "in.parquet"), output, "--id-column", "doc_id", "--batch-size", 2))
    assert result.exit_code == 0, result.output
    assert "5 rows" in result.stdout

    table = pq.read_table(output)
    # num_tokens and truncated (every task) sit between the passed-through columns and the results.
    assert table.column_names == ["doc_id", "year", "num_tokens", "truncated", *result_columns]
    assert table.schema.field("num_tokens").type == pa.int32() and table.schema.field("truncated").type == pa.bool_()
    assert table.column("doc_id").to_pylist() == [f"d{i}" for i in range(len(TEXTS))]
    assert table.column("year").type == pa.int16()
    rows = table.to_pylist()
    max_length = export.manifest.max_length
    for text, row in zip(TEXTS, rows):
        if text is None:
            assert all(row[column] is None for column in [*result_columns[:-1], "num_tokens", "truncated"])
            assert "null text" in row["error"]
            continue
        assert row["error"] is None
        assert (row["num_tokens"], row["truncated"]) == (reference.token_count(text), False)
        if task == "embed":
            np.testing.assert_allclose(row["embedding"], reference.embed(text, max_length=max_length), atol=1e-4)
        elif task == "classify":
            expected = reference.classify(text, max_length=max_length)
            np.testing.assert_allclose(row["probs"], expected, atol=1e-5)
            assert (row["label_id"], row["label"]) == (int(np.argmax(expected)), LABELS[int(np.argmax(expected))])
            assert row["score"] == pytest.approx(float(np.max(expected)), abs=1e-5)
            np.testing.assert_allclose(softmax(np.asarray(row["logits"])), expected, atol=1e-5)
        elif task == "token-classify":
            expected_entities = reference.entities(text, max_length=max_length)
            assert [(e["label"], e["start"], e["end"]) for e in row["entities"]] == [(e[0], e[2], e[3]) for e in expected_entities]
            np.testing.assert_allclose([e["score"] for e in row["entities"]], [e[1] for e in expected_entities], atol=1e-5)
            assert all(e["text"] == text[e["start"] : e["end"]] for e in row["entities"])
        else:
            expected_fills = reference.fill_mask(text, max_length=max_length, top_k=export.manifest.top_k or 0)
            assert [[fill["token_id"] for fill in fills] for fills in row["fills"]] == [ids for ids, _ in expected_fills]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def test_run_top_k_and_max_length_options(tmp_path: Path, tiny_fill_mask_export: ExportResult, fill_mask_reference: TorchReference) -> None:
    output = tmp_path / "out"
    source = write_input(tmp_path / "in.parquet")
    result = invoke(*run_args(tiny_fill_mask_export.directory, source, output, "--top-k", 2, "--max-length", 8, "--log-format", "json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # Cut to 8 tokens, "Sinan loves a beautiful [MASK] and a [MASK]" (12) loses its second [MASK].
    truncated = sum(fill_mask_reference.token_count(text) > 8 for text in TEXTS if text is not None)
    assert summary["truncated_rows"] == truncated == 2
    fills = pq.read_table(output).column("fills").to_pylist()
    for text, row in zip(TEXTS, fills):
        expected = None if text is None else fill_mask_reference.fill_mask(text, max_length=8, top_k=2)
        assert (None if row is None else [[fill["token_id"] for fill in entry] for entry in row]) == (
            None if expected is None else [ids for ids, _ in expected]
        )
    assert [len(row or []) for row in fills] == [0, 0, 0, 1, 1]


def test_json_log_format_ends_with_a_summary_line(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    result = invoke(*run_args(tiny_embed_export.directory, write_input(tmp_path / "in.parquet"), tmp_path / "out", "--log-format", "json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["event"] == "summary"
    assert (summary["rows"], summary["error_rows"], summary["truncated_rows"]) == (5, 1, 0)
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["already_complete"] is False
    events = [json.loads(line)["event"] for line in result.stderr.strip().splitlines()]
    assert events[0] == "start"

    again = invoke(*run_args(tiny_embed_export.directory, tmp_path / "in.parquet", tmp_path / "out", "--log-format", "json"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_complete"] is True


def test_a_missing_column_exits_3_naming_the_file_and_column(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    source = write_input(tmp_path / "in.parquet")
    output = tmp_path / "out"
    result = invoke("run", "--model", tiny_embed_export.directory, "--input", source, "--output", output, "--text-column", "body")
    assert result.exit_code == ExitCode.INPUT_ERROR == 3
    line = one_line_error(result)
    assert str(source) in line and "'body'" in line
    assert not output.exists()


def test_an_unreadable_file_exits_3_and_writes_nothing(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_input(inputs / "a.parquet")
    corrupt = inputs / "x.parquet"
    corrupt.write_bytes(os.urandom(2048))
    output = tmp_path / "out"
    result = invoke(*run_args(tiny_embed_export.directory, inputs, output))
    assert result.exit_code == ExitCode.INPUT_ERROR
    assert str(corrupt) in one_line_error(result)
    assert not output.exists()


def test_a_missing_input_exits_3(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    result = invoke(*run_args(tiny_embed_export.directory, tmp_path / "nowhere" / "*.parquet", tmp_path / "out"))
    assert result.exit_code == ExitCode.INPUT_ERROR
    assert "nowhere" in one_line_error(result)


def test_a_missing_model_directory_exits_4(tmp_path: Path) -> None:
    model = tmp_path / "no-such-model"
    result = invoke(*run_args(model, write_input(tmp_path / "in.parquet"), tmp_path / "out"))
    assert result.exit_code == ExitCode.MODEL_ERROR == 4
    assert str(model) in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_an_unvalidated_export_exits_4(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_embed_export.directory, model)
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    manifest["validation"]["passed"] = False
    (model / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = invoke(*run_args(model, write_input(tmp_path / "in.parquet"), tmp_path / "out"))
    assert result.exit_code == ExitCode.MODEL_ERROR
    assert "validation" in one_line_error(result)


def test_a_different_job_in_the_output_exits_9(tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference) -> None:
    source = write_input(tmp_path / "in.parquet")
    output = tmp_path / "out"
    assert invoke(*run_args(tiny_embed_export.directory, source, output)).exit_code == 0
    before = pq.read_table(output)

    result = invoke(*run_args(tiny_embed_export.directory, source, output, "--max-length", 4))
    assert result.exit_code == ExitCode.OUTPUT_CONFLICT == 9
    line = one_line_error(result)
    assert "max_length" in line and "--overwrite" in line
    assert pq.read_table(output).equals(before)

    replaced = invoke(*run_args(tiny_embed_export.directory, source, output, "--max-length", 4, "--overwrite", "--log-format", "json"))
    assert replaced.exit_code == 0, replaced.output
    truncated = sum(embed_reference.token_count(text) > 4 for text in TEXTS if text is not None)
    assert json.loads(replaced.stdout.strip().splitlines()[-1])["truncated_rows"] == truncated == 3


def test_a_locked_output_exits_8(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    output = tmp_path / "out"
    output.mkdir()
    with OutputLock(output):
        result = invoke(*run_args(tiny_embed_export.directory, write_input(tmp_path / "in.parquet"), output))
    assert result.exit_code == ExitCode.LOCKED
    assert "another bertbatch run" in one_line_error(result)


@pytest.mark.parametrize(
    "extra",
    [
        ["--device", "gpu"],
        ["--batch-size", "many"],
        ["--no-such-option"],
        ["--batch-size", "0"],
        ["--top-k", "2"],  # embed models have no --top-k
        ["--max-length", "100000"],
    ],
)
def test_bad_options_exit_2(tmp_path: Path, tiny_embed_export: ExportResult, extra: list[str]) -> None:
    result = invoke(*run_args(tiny_embed_export.directory, write_input(tmp_path / "in.parquet"), tmp_path / "out", *extra))
    assert result.exit_code == ExitCode.USAGE_ERROR == 2, result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("out/*.parquet"))


def test_missing_required_options_exit_2(tmp_path: Path) -> None:
    result = invoke("run", "--input", write_input(tmp_path / "in.parquet"))
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert "--output" in result.output or "--text-column" in result.output


def cuda_works(model_file: Path) -> bool:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False
    session = onnxruntime.InferenceSession(str(model_file), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return session.get_providers()[0] == "CUDAExecutionProvider"


def test_device_cuda_without_cuda_exits_6_never_runs_on_cpu(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    if cuda_works(tiny_embed_export.directory / "model.onnx"):
        pytest.skip("onnxruntime gets CUDA here; test_device_cuda_runs_on_cuda covers this machine")
    result = invoke(*run_args(tiny_embed_export.directory, write_input(tmp_path / "in.parquet"), tmp_path / "out", "--device", "cuda"))
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6
    assert "--device cuda" in one_line_error(result)
    assert not list(tmp_path.glob("out/*.parquet"))


def test_a_run_that_cannot_start_leaves_the_previous_output_untouched(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    # --overwrite replaces another job's output only once the new run is up: a device error changes nothing.
    if cuda_works(tiny_embed_export.directory / "model.onnx"):
        pytest.skip("onnxruntime gets CUDA here, so --device cuda starts")
    data, output = write_input(tmp_path / "in.parquet"), tmp_path / "out"
    first = invoke(*run_args(tiny_embed_export.directory, data, output, "--device", "cpu", "--max-length", "16"))
    assert first.exit_code == 0, first.output
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    result = invoke(*run_args(tiny_embed_export.directory, data, output, "--device", "cuda", "--overwrite"))
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6
    after = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    assert after == before


def test_device_cuda_on_a_finished_job_still_exits_6_without_cuda(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    # Nothing left to run is no excuse: a script asking for CUDA on a machine without it must learn it.
    if cuda_works(tiny_embed_export.directory / "model.onnx"):
        pytest.skip("onnxruntime gets CUDA here")
    data, output = write_input(tmp_path / "in.parquet"), tmp_path / "out"
    assert invoke(*run_args(tiny_embed_export.directory, data, output, "--device", "cpu")).exit_code == 0
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    result = invoke(*run_args(tiny_embed_export.directory, data, output, "--device", "cuda"))
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6
    assert "--device cuda" in one_line_error(result)
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == before


@pytest.mark.gpu
def test_device_cuda_runs_on_cuda(tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference) -> None:
    if not cuda_works(tiny_embed_export.directory / "model.onnx"):
        pytest.skip("onnxruntime cannot use CUDA on this machine")
    output = tmp_path / "out"
    result = invoke(*run_args(tiny_embed_export.directory, write_input(tmp_path / "in.parquet"), output, "--device", "cuda", "--log-format", "json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["provider"] == "CUDAExecutionProvider"
    embedding = pq.read_table(output).column("embedding").to_pylist()[0]
    np.testing.assert_allclose(embedding, embed_reference.embed("i love kathmandu", max_length=tiny_embed_export.manifest.max_length), atol=1e-3)


def test_export_then_validate_then_run(tmp_path: Path, tiny_base_checkpoint: Path, embed_reference: TorchReference) -> None:
    model = tmp_path / "models" / "tiny"
    result = invoke("export", tiny_base_checkpoint, "--task", "embed", "--out", model)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(model)
    assert manifest.validated and manifest.task == "embed"

    assert invoke("validate", model).exit_code == 0

    output = tmp_path / "out"
    assert invoke(*run_args(model, write_input(tmp_path / "in.parquet"), output)).exit_code == 0
    np.testing.assert_allclose(
        pq.read_table(output).column("embedding").to_pylist()[0], embed_reference.embed("i love kathmandu", max_length=manifest.max_length), atol=1e-4
    )

    again = invoke("export", tiny_base_checkpoint, "--task", "embed", "--out", model)
    assert again.exit_code == ExitCode.OUTPUT_CONFLICT
    assert "--overwrite" in one_line_error(again)


def test_validate_exits_5_when_the_onnx_file_is_not_the_checkpoints(
    tmp_path: Path, tiny_embed_export: ExportResult, tiny_four_layer_checkpoint: Path
) -> None:
    other = tmp_path / "other"
    assert invoke("export", tiny_four_layer_checkpoint, "--task", "embed", "--out", other).exit_code == 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_embed_export.directory, broken)
    shutil.copyfile(other / "model.onnx", broken / "model.onnx")

    result = invoke("validate", broken)
    assert result.exit_code == ExitCode.VALIDATION_FAILED == 5
    assert "differ" in result.stderr.strip().splitlines()[-1]
    assert invoke("validate", tiny_embed_export.directory).exit_code == 0


def test_export_of_a_missing_checkpoint_exits_4(tmp_path: Path, offline_hub: Path) -> None:
    result = invoke("export", tmp_path / "no-such-checkpoint", "--task", "embed", "--out", tmp_path / "model")
    assert result.exit_code == ExitCode.MODEL_ERROR
    assert "no-such-checkpoint" in one_line_error(result)
    assert not (tmp_path / "model").exists()


def test_the_cli_starts_without_torch_and_the_worker_never_imports_it(tmp_path: Path) -> None:
    code = (
        "import sys, worker.cli, worker.job, worker.runner, worker.decode, worker.default_model\n"
        "heavy = [name for name in ('torch', 'transformers', 'onnxruntime') if name in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == ""
    help_text = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0
    assert "--text-column" in help_text.stdout and "--device" in help_text.stdout


@pytest.mark.slow
def test_the_default_model_is_exported_on_first_use_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    models = tmp_path / "models"
    monkeypatch.setenv("BERTBATCH_MODELS", str(models))
    texts = ["i love kathmandu", "A man is playing a guitar.", "", "Stock markets fell sharply on Monday."]
    source = write_input(tmp_path / "in.parquet", texts)

    first = invoke("run", "--input", source, "--output", tmp_path / "first", "--text-column", "text")
    assert first.exit_code == 0, first.output
    default = models / "all-MiniLM-L6-v2"
    assert "exporting the default model" in first.stderr
    assert read_manifest(default).validated
    exported_at = (default / "model.onnx").stat().st_mtime_ns

    second = invoke("run", "--input", source, "--output", tmp_path / "second", "--text-column", "text")
    assert second.exit_code == 0, second.output
    assert "exporting the default model" not in second.stderr
    assert (default / "model.onnx").stat().st_mtime_ns == exported_at

    expected = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts)
    for name in ("first", "second"):
        got = np.asarray(pq.read_table(tmp_path / name).column("embedding").to_pylist(), dtype=np.float32)
        cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        assert cosine.min() >= 0.9999
