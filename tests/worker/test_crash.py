"""Crash safety of `bertbatch run`, with real processes.

A job is killed (SIGKILL) at several points, stopped with SIGTERM or SIGINT, or
raced by a second run on the same output. After a rerun of the same command the
output must equal an uninterrupted run's, row for row, with no partial or
temporary file left. No test hook is involved: kill points are found by watching
the output directory of a job cut into many small shards.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.export import ExportResult
from worker.exit_codes import ExitCode
from worker.jobstate import JOB_FILE, LOCK_FILE, SUCCESS_FILE

FILES = 2
ROWS_PER_FILE = 300
ROWS_PER_GROUP = 20  # also --rows-per-shard: one row group per shard
SHARDS = FILES * ROWS_PER_FILE // ROWS_PER_GROUP
ROWS = FILES * ROWS_PER_FILE
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def write_inputs(directory: Path) -> Path:
    """Several files of many row groups; every 97th text is null, so error rows are in the mix."""
    directory.mkdir()
    rng = random.Random(0)
    for index in range(FILES):
        ids = range(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE)
        texts = [None if i % 97 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 24))) for i in ids]
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})
        pq.write_table(table, directory / f"input-{index}.parquet", row_group_size=ROWS_PER_GROUP)
    return directory


@dataclass(frozen=True)
class Job:
    model: Path
    inputs: Path

    def command(self, output: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "worker.cli", "run",
            "--model", str(self.model), "--input", str(self.inputs), "--output", str(output),
            "--text-column", "text", "--id-column", "id", "--rows-per-shard", str(ROWS_PER_GROUP),
            "--device", "cpu", "--log-format", "json", *extra,
        ]  # fmt: skip

    def start(self, output: Path, *extra: str) -> subprocess.Popen[str]:
        # SIGINT back to its default, so Python turns it into KeyboardInterrupt even when
        # this test runs under a parent that ignores SIGINT (a background CI job).
        return subprocess.Popen(
            self.command(output, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def run(self, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(output, *extra), capture_output=True, text=True, timeout=300)


@dataclass(frozen=True)
class Reference:
    table: pa.Table
    run: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_embed_export: ExportResult) -> Job:
    return Job(tiny_embed_export.directory, write_inputs(tmp_path_factory.mktemp("crash") / "inputs"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, job: Job) -> Reference:
    """One uninterrupted run: what every interrupted and resumed run must end up with."""
    output = tmp_path_factory.mktemp("reference") / "out"
    completed = job.run(output)
    assert completed.returncode == 0, completed.stderr
    table = read_output(output)
    assert table.column("id").to_pylist() == list(range(ROWS))
    return Reference(table, completed)


def part_files(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def temporaries(output: Path) -> list[Path]:
    return sorted(output.glob(".*.tmp-*"))


def read_output(output: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in part_files(output))


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended (exit {process.returncode}) before {what}: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.0005)  # a temporary shard may exist for a millisecond only


def wait_stopped(process: subprocess.Popen[str]) -> None:
    """Until every thread of ``process`` is stopped (SIGSTOP lands at the end of a system call)."""

    def state(stat: Path) -> str:
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:  # a thread that ended meanwhile
            return "T"

    deadline = time.monotonic() + 30
    while any(state(stat) != "T" for stat in Path(f"/proc/{process.pid}/task").glob("*/stat")):
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(0.002)


def assert_consistent_after_a_crash(output: Path) -> None:
    """What a killed job may leave: whole shards (each recorded or not), the job file, hidden temporaries."""
    allowed = {JOB_FILE, LOCK_FILE}
    for path in output.iterdir():
        assert path.name in allowed or path.name.startswith("part-") or path in temporaries(output), path
    for path in part_files(output):
        assert pq.read_table(path).num_rows == ROWS_PER_GROUP, f"{path.name} is not a whole shard"
    if (output / JOB_FILE).exists():
        recorded = json.loads((output / JOB_FILE).read_text())["completed"]
        for name, rows in recorded.items():
            assert (output / name).is_file() and rows == ROWS_PER_GROUP, name


def assert_equals_reference(output: Path, reference: Reference) -> None:
    names = {path.name for path in output.iterdir()}
    assert names == {path.name for path in part_files(output)} | {JOB_FILE, SUCCESS_FILE, LOCK_FILE}
    assert len(part_files(output)) == SHARDS
    assert not temporaries(output)
    recorded = json.loads((output / JOB_FILE).read_text())["completed"]
    assert sorted(recorded) == [path.name for path in part_files(output)]
    got = read_output(output)
    ids = got.column("id").to_pylist()
    assert ids == list(range(ROWS)), "rows missing, duplicated or out of order"
    assert got.column_names == reference.table.column_names
    assert got.column("error").to_pylist() == reference.table.column("error").to_pylist()
    assert got.column("embedding").is_null().to_pylist() == reference.table.column("embedding").is_null().to_pylist()
    expected = reference.table.column("embedding").to_pylist()
    present = [i for i, vector in enumerate(expected) if vector is not None]
    actual = got.column("embedding").to_pylist()
    # The same rows in the same batches give the same numbers; the tolerance only allows for
    # onnxruntime choosing another kernel on a machine under load.
    np.testing.assert_allclose(np.array([actual[i] for i in present]), np.array([expected[i] for i in present]), rtol=0, atol=1e-6)


def summary_of(completed: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_reference_run_logs_json_lines_only(reference: Reference) -> None:
    stderr_records = [json.loads(line) for line in reference.run.stderr.splitlines()]
    stdout_records = [json.loads(line) for line in reference.run.stdout.splitlines()]
    assert [record["event"] for record in stderr_records][:2] == ["start", "progress"]
    assert {record["event"] for record in stderr_records} == {"start", "progress"}
    assert stderr_records[0]["rows_to_do"] == ROWS
    assert [record["event"] for record in stdout_records] == ["summary"]
    summary = stdout_records[0]
    assert summary["rows"] == ROWS and summary["shards_written"] == SHARDS and summary["shards_skipped"] == 0
    error_rows = [error for error in reference.table.column("error").to_pylist() if error is not None]
    assert summary["error_rows"] == len(error_rows) == len(range(0, ROWS, 97))


KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    "as soon as the job file exists": lambda output: (output / JOB_FILE).exists(),
    "mid-shard, with a temporary shard open": lambda output: len(part_files(output)) >= 2 and bool(temporaries(output)),
    "after eight committed shards": lambda output: len(part_files(output)) >= 8,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_gives_the_uninterrupted_output(tmp_path: Path, job: Job, reference: Reference, point: str) -> None:
    output = tmp_path / "out"
    process = job.start(output)
    wait_until(lambda: KILL_POINTS[point](output), process, point)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (output / SUCCESS_FILE).exists()
    assert_consistent_after_a_crash(output)
    shards_before = len(json.loads((output / JOB_FILE).read_text())["completed"])

    rerun = job.run(output)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_of(rerun)["shards_skipped"] == shards_before
    assert_equals_reference(output, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_repeated_sigkills_at_random_moments_then_rerun(tmp_path: Path, job: Job, reference: Reference, seed: int) -> None:
    """Kills after a random number of new shards plus a random fraction of the next one, so they
    land anywhere in a shard's cycle (compute, write, fsync, rename, job file update) on any machine."""
    rng = random.Random(seed)
    output = tmp_path / "out"
    for _ in range(3):
        target = rng.randint(len(part_files(output)) + 1, len(part_files(output)) + 6)
        process = job.start(output)
        wait_until(lambda: len(part_files(output)) >= target, process, f"{target} shards")
        time.sleep(rng.uniform(0.0, 0.02))
        process.kill()
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert_consistent_after_a_crash(output)
    assert len(part_files(output)) < SHARDS
    rerun = job.run(output)
    assert rerun.returncode == 0, rerun.stderr
    assert_equals_reference(output, reference)


def test_a_shard_renamed_but_not_recorded_and_stale_temporaries_are_redone(
    tmp_path: Path, job: Job, reference: Reference
) -> None:
    """The state a SIGKILL leaves between a shard's rename and the job file's update, built directly:
    that window is too short to hit reliably with a signal."""
    output = tmp_path / "out"
    job.run(output)  # a finished job, then turned back into a crashed one
    job_file = output / JOB_FILE
    record = json.loads(job_file.read_text())
    unrecorded = sorted(record["completed"])[-3:]
    for name in unrecorded:
        del record["completed"][name]
    deleted = sorted(record["completed"])[5]
    (output / deleted).unlink()  # recorded, but gone: must be redone too
    job_file.write_text(json.dumps(record))
    (output / SUCCESS_FILE).unlink()
    (output / f".{unrecorded[0]}.tmp-99999").write_bytes((output / unrecorded[0]).read_bytes()[:100])
    (output / f".{JOB_FILE}.tmp-99999").write_text('{"version": 1, "ident')

    rerun = job.run(output)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_of(rerun)["shards_written"] == 4
    assert_equals_reference(output, reference)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_exit_130_without_temporaries_and_resume(
    tmp_path: Path, job: Job, reference: Reference, sent: signal.Signals
) -> None:
    output = tmp_path / "out"
    process = job.start(output)
    wait_until(lambda: len(part_files(output)) >= 3 and bool(temporaries(output)), process, "a shard in progress")
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED == 130
    assert "interrupted: finished shards are kept; run the same command again to resume" in stderr
    assert not temporaries(output), "the shard in progress was not removed"
    assert not (output / SUCCESS_FILE).exists()
    assert_consistent_after_a_crash(output)
    assert 3 <= len(part_files(output)) < SHARDS

    rerun = job.run(output)
    assert rerun.returncode == 0, rerun.stderr
    assert_equals_reference(output, reference)


def test_a_second_run_on_a_busy_output_exits_8_at_once_and_touches_nothing(
    tmp_path: Path, job: Job, reference: Reference
) -> None:
    output = tmp_path / "out"
    first = job.start(output)
    wait_until(lambda: len(part_files(output)) >= 2 and bool(temporaries(output)), first, "a shard in progress")
    first.send_signal(signal.SIGSTOP)  # the first run holds the lock and stands still
    try:
        wait_stopped(first)
        before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
        # A second run that waited for the lock would hang here on the stopped first one.
        second = subprocess.run(job.command(output), capture_output=True, text=True, timeout=120)
        after = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == ExitCode.LOCKED == 8
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {output}: locked by pid {first.pid}; another bertbatch run is writing this output"
    )
    assert after == before, "the locked-out run changed the output"
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert_equals_reference(output, reference)
