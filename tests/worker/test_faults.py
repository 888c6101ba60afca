"""Resource faults: the device runs out of memory, the disk fills up, an interrupt lands
mid-write, the job gives up after too many bad rows. Each ends in a documented way and
leaves an output that a rerun completes to exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
from tokenizers import Tokenizer
from typer.testing import CliRunner, Result

from exporter.export import ExportResult
from worker.batching import PaddedBatch
from worker.cli import app
from worker.config import RunConfig
from worker.exit_codes import ExitCode
from worker.job import run_job
from worker.jobstate import JOB_FILE, SUCCESS_FILE
from worker.runner import Runner

ROWS = 60
ROWS_PER_SHARD = 10
NULL_ROWS = (13, 21, 25, 40)  # shards 1, 2, 2 and 4
POISON_ROW = 33
WORDS = "the river runs past old stone houses where children play football in narrow streets".split()
OUT_OF_MEMORY = "Failed to allocate memory for requested buffer of size 8388608"  # onnxruntime's words


def texts() -> list[str | None]:
    rows: list[str | None] = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 23)) for i in range(ROWS)]
    for row in NULL_ROWS:
        rows[row] = None
    rows[POISON_ROW] = "i love kathmandu"
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "in.parquet"
    table = pa.table({"id": pa.array(range(ROWS), pa.int64()), "text": pa.array(texts(), pa.string())})
    pq.write_table(table, path, row_group_size=ROWS_PER_SHARD)
    return path


def make_config(export: ExportResult, inputs: Path, output: Path, **options: Any) -> RunConfig:
    settings: dict[str, Any] = {"batch_size": 16, "rows_per_shard": ROWS_PER_SHARD, "device": "cpu"}
    return RunConfig(model_dir=export.directory, input=str(inputs), output=output, text_column="text", id_column="id", **{**settings, **options})


def cli_args(export: ExportResult, inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run", "--model", str(export.directory), "--input", str(inputs), "--output", str(output), "--text-column", "text",
        "--id-column", "id", "--batch-size", "16", "--rows-per-shard", str(ROWS_PER_SHARD), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_embed_export: ExportResult, inputs: Path) -> pa.Table:
    """The output of an uninterrupted run without faults."""
    output = tmp_path_factory.mktemp("faults-reference") / "out"
    run_job(make_config(tiny_embed_export, inputs, output))
    return read_output(output)


def read_output(output: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in sorted(output.glob("part-*.parquet")))


def assert_rows_equal(got: pa.Table, expected: pa.Table, atol: float = 1e-6, except_rows: tuple[int, ...] = ()) -> None:
    assert got.column("id").to_pylist() == list(range(ROWS))
    got_vectors, expected_vectors = got.column("embedding").to_pylist(), expected.column("embedding").to_pylist()
    for row in range(ROWS):
        if row in except_rows:
            continue
        assert got.column("error")[row].as_py() == expected.column("error")[row].as_py(), row
        if expected_vectors[row] is None:
            assert got_vectors[row] is None, row
        else:
            np.testing.assert_allclose(got_vectors[row], expected_vectors[row], rtol=0, atol=atol, err_msg=f"row {row}")


def stage_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("bertbatch-")]


def test_out_of_memory_batches_are_split_until_they_fit(
    tiny_embed_export: ExportResult, inputs: Path, reference: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Runner.run
    failed: list[int] = []
    succeeded: list[int] = []

    def small_device(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        if len(batch.rows) > 2:
            failed.append(len(batch.rows))
            raise RuntimeException(OUT_OF_MEMORY)
        succeeded.append(len(batch.rows))
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", small_device)
    summary = run_job(make_config(tiny_embed_export, inputs, tmp_path / "out"))

    assert summary.rows == ROWS and summary.error_rows == len(NULL_ROWS)
    assert max(failed) > 2 and max(succeeded) <= 2
    assert sum(succeeded) == ROWS, "every row ran exactly once"
    # Other batch shapes mean other padding: equal up to float rounding.
    assert_rows_equal(read_output(tmp_path / "out"), reference, atol=1e-5)


def test_a_row_that_fails_even_alone_becomes_an_error_row(
    tiny_embed_export: ExportResult, inputs: Path, reference: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = Tokenizer.from_file(str(tiny_embed_export.directory / "tokenizer.json")).token_to_id("kathmandu")
    original = Runner.run

    def allocation_fails_for_one_row(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        if (batch.input_ids == poison).any():
            raise RuntimeException(OUT_OF_MEMORY)
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", allocation_fails_for_one_row)
    summary = run_job(make_config(tiny_embed_export, inputs, tmp_path / "out"))

    got = read_output(tmp_path / "out")
    assert summary.rows == ROWS and summary.error_rows == len(NULL_ROWS) + 1
    assert got.column("error")[POISON_ROW].as_py() == f"inference failed: RuntimeException: {OUT_OF_MEMORY}"
    assert got.column("embedding")[POISON_ROW].as_py() is None
    assert_rows_equal(got, reference, atol=1e-5, except_rows=(POISON_ROW,))


def test_a_model_that_fails_on_every_row_stops_the_job_and_keeps_finished_shards(
    tiny_embed_export: ExportResult, inputs: Path, reference: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lost device fails every batch: that must stop the job (exit 4), not write a dataset of error rows.
    original = Runner.run
    calls = [0]

    def device_lost_after_two_calls(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeException("CUDA failure 999: unknown error")
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", device_lost_after_two_calls)
    result = invoke(cli_args(tiny_embed_export, inputs, tmp_path / "out"))
    assert result.exit_code == ExitCode.MODEL_ERROR, result.output
    assert "failed on all" in result.output and "CUDA failure 999" in result.output
    recorded = json.loads((tmp_path / "out" / JOB_FILE).read_text())["completed"]
    assert 0 < len(recorded) < ROWS // ROWS_PER_SHARD, "the shards finished before the failure are kept"
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()

    monkeypatch.setattr(Runner, "run", original)
    assert invoke(cli_args(tiny_embed_export, inputs, tmp_path / "out")).exit_code == 0
    assert_rows_equal(read_output(tmp_path / "out"), reference, atol=1e-5)


@dataclass(frozen=True)
class Fault:
    """Raise ``error`` at the ``nth`` call of one I/O step."""

    target: Any
    name: str
    nth: int
    error: BaseException
    only: Callable[..., bool] = lambda *args: True


NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FAULTS = {
    "writing a shard": Fault(pq.ParquetWriter, "write_table", 3, NO_SPACE),
    "closing a shard": Fault(pq.ParquetWriter, "close", 3, NO_SPACE),
    "renaming a shard": Fault(os, "replace", 3, NO_SPACE, lambda source, target: Path(target).name.startswith("part-")),
    "saving the job file": Fault(os, "replace", 3, NO_SPACE, lambda source, target: Path(target).name == JOB_FILE),
    "writing _SUCCESS": Fault(os, "replace", 1, NO_SPACE, lambda source, target: Path(target).name == SUCCESS_FILE),
    "Ctrl-C while writing a shard": Fault(pq.ParquetWriter, "write_table", 3, KeyboardInterrupt()),
}


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Callable[[Fault], None]:
    def install(fault: Fault) -> None:
        original = getattr(fault.target, fault.name)
        calls = 0

        def failing(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            watched = fault.only(*args[-2:]) if fault.target is os else True
            if watched:
                calls += 1
                if calls == fault.nth:
                    raise fault.error
            return original(*args, **kwargs)

        monkeypatch.setattr(fault.target, fault.name, failing)

    return install


@pytest.mark.parametrize("where", list(FAULTS))
def test_a_write_fault_leaves_no_partial_shard_and_a_rerun_completes(
    tiny_embed_export: ExportResult,
    inputs: Path,
    reference: pa.Table,
    tmp_path: Path,
    inject: Callable[[Fault], None],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    output = tmp_path / "out"
    fault = FAULTS[where]
    inject(fault)
    failed = invoke(cli_args(tiny_embed_export, inputs, output))
    monkeypatch.undo()

    if isinstance(fault.error, KeyboardInterrupt):
        assert failed.exit_code == ExitCode.INTERRUPTED, failed.output
        assert failed.stderr.strip().splitlines()[-1] == "interrupted: finished shards are kept; run the same command again to resume"
    else:
        assert failed.exit_code == ExitCode.OUTPUT_ERROR == 10, failed.output
        error = failed.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: {output}/") and error.endswith("[Errno 28] No space left on device"), error
    assert not stage_threads(), "the reading and inference threads outlived the job"
    assert not list(output.glob(".*.tmp-*")), "a temporary file was left behind"
    assert not (output / SUCCESS_FILE).exists()
    recorded = json.loads((output / JOB_FILE).read_text())["completed"]  # intact, and parseable
    for path in output.glob("part-*.parquet"):  # every visible shard is whole
        assert pq.read_table(path).num_rows == ROWS_PER_SHARD, path.name
    assert all((output / name).is_file() for name in recorded)
    assert len(recorded) < ROWS // ROWS_PER_SHARD or where == "writing _SUCCESS"

    rerun = invoke(cli_args(tiny_embed_export, inputs, output, "--log-format", "json"))
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["shards_skipped"] == len(recorded)
    assert (output / SUCCESS_FILE).is_file()
    assert_rows_equal(read_output(output), reference)


def test_max_errors_exits_7_keeps_finished_shards_and_a_rerun_is_consistent(
    tiny_embed_export: ExportResult, inputs: Path, reference: pa.Table, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shard_names = [f"part-00000-{i:05d}.parquet" for i in range(ROWS // ROWS_PER_SHARD)]

    first = invoke(cli_args(tiny_embed_export, inputs, output, "--max-errors", "2"))
    assert first.exit_code == ExitCode.PARTIAL == 7, first.output
    # Shard 2 brings the count to 3 (rows 13, 21, 25): it is dropped, shards 0 and 1 stay.
    assert first.stderr.strip().splitlines()[-1] == (
        f"error: 3 rows failed, more than --max-errors 2; 2 finished shards are kept in {output}, the current one is dropped"
    )
    assert sorted(path.name for path in output.glob("part-*")) == shard_names[:2]
    assert not list(output.glob(".*.tmp-*")) and not (output / SUCCESS_FILE).exists()

    # A rerun counts its own failures: shards 2 and 3 pass (2 errors), shard 4 brings a third.
    second = invoke(cli_args(tiny_embed_export, inputs, output, "--max-errors", "2"))
    assert second.exit_code == ExitCode.PARTIAL, second.output
    assert sorted(path.name for path in output.glob("part-*")) == shard_names[:4]

    # --max-errors is not part of the job's identity: without it the job resumes and completes.
    last = invoke(cli_args(tiny_embed_export, inputs, output))
    assert last.exit_code == 0, last.output
    assert sorted(path.name for path in output.glob("part-*")) == shard_names
    assert_rows_equal(read_output(output), reference)


@pytest.mark.parametrize(("option", "value"), [("--rows-per-shard", "0"), ("--max-errors", "-1")])
def test_limits_that_make_no_sense_exit_2(tiny_embed_export: ExportResult, inputs: Path, tmp_path: Path, option: str, value: str) -> None:
    result = invoke(cli_args(tiny_embed_export, inputs, tmp_path / "out", option, value))  # the last one given wins
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert result.stderr.strip() == f"error: {option} must be {'at least 1' if value == '0' else '0 or more'}, got {value}"
    assert not (tmp_path / "out").exists()
