"""Job bookkeeping without a model: identity, resume, conflicts, --overwrite, the lock, ``_SUCCESS``."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelless import fake_model_dir, manifest

from worker.config import RunConfig
from worker.errors import JobLocked, OutputConflict, OutputError
from worker.jobstate import JOB_FILE, LOCK_FILE, SUCCESS_FILE, JobState, OutputLock, begin, job_identity, open_job, write_success
from worker.runner import ModelDir
from worker.source import InputFile, inspect_inputs


@pytest.fixture
def model_dir(tmp_path: Path) -> ModelDir:
    return fake_model_dir(tmp_path / "model", manifest("embed"))


@pytest.fixture
def files(tmp_path: Path) -> list[InputFile]:
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    return inspect_inputs([tmp_path / "in.parquet"], "text", None, None)


@pytest.fixture
def config(tmp_path: Path, model_dir: ModelDir) -> RunConfig:
    return RunConfig(model_dir=model_dir.path, input=str(tmp_path / "in.parquet"), output=tmp_path / "out", text_column="text")


@pytest.fixture
def output(config: RunConfig) -> Path:
    config.output.mkdir()
    return config.output


def test_the_identity_covers_what_changes_rows_and_not_what_changes_speed(
    config: RunConfig, model_dir: ModelDir, files: list[InputFile]
) -> None:
    identity = job_identity(config, model_dir, files)
    assert job_identity(replace(config, batch_size=3, max_tokens=99, threads=1, device="cpu", max_errors=2), model_dir, files) == identity
    for change in ({"top_k": 2}, {"max_length": 8}, {"keep_text": True}, {"rows_per_shard": 5}, {"id_column": "id"}):
        assert job_identity(replace(config, **change), model_dir, files) != identity, change  # type: ignore[arg-type]
    # A re-exported model (same manifest, other weights) is another job.
    model_dir.model_file.write_bytes(b"other weights")
    assert job_identity(config, model_dir, files)["model_fingerprint"] != identity["model_fingerprint"]
    # So is an input file that changed since.
    os.utime(files[0].path, ns=(files[0].mtime_ns + 10**9, files[0].mtime_ns + 10**9))
    changed = inspect_inputs([files[0].path], "text", None, None)
    assert job_identity(config, model_dir, changed)["inputs"] != identity["inputs"]


def test_a_fresh_output_starts_empty_and_begin_makes_it_real(output: Path) -> None:
    (output / ".part-00000-00000.parquet.tmp-4242").write_bytes(b"torn")  # a crashed writer's leftover
    state = open_job(output, {"model_fingerprint": "x"}, overwrite=False)
    assert (state.completed, state.clear_first) == ({}, False)
    assert not (output / JOB_FILE).exists(), "opening a job changes nothing"
    begin(state)
    assert json.loads((output / JOB_FILE).read_text()) == {
        "version": 1, "identity": {"model_fingerprint": "x"}, "completed": {}, "output": str(output)
    }
    assert sorted(path.name for path in output.iterdir()) == [JOB_FILE]


def test_the_same_job_resumes_with_the_shards_that_still_exist(output: Path) -> None:
    state = open_job(output, {"k": 1}, overwrite=False)
    begin(state)
    for name in ("part-00000-00000.parquet", "part-00000-00001.parquet"):
        (output / name).write_bytes(b"shard")
        state.record(name, 10)
    write_success(state, rows=20, error_rows=1, provider="CPUExecutionProvider")
    assert json.loads((output / SUCCESS_FILE).read_text()) == {"rows_this_run": 20, "error_rows_this_run": 1, "provider": "CPUExecutionProvider"}
    (output / "part-00000-00001.parquet").unlink()  # deleted by hand: it is done again
    resumed = open_job(output, {"k": 1}, overwrite=False)
    assert resumed.completed == {"part-00000-00000.parquet": 10}
    begin(resumed)
    assert not (output / SUCCESS_FILE).exists(), "work is pending: the job is not complete"


def test_a_different_job_is_refused_naming_what_changed_unless_overwrite(output: Path) -> None:
    begin(open_job(output, {"top_k": 1, "task": "fill-mask"}, overwrite=False))
    (output / "part-00000-00000.parquet").write_bytes(b"shard")
    (output / "subdirectory").mkdir()
    with pytest.raises(OutputConflict, match=r"holds a different job \(changed: top_k\); use another --output, or --overwrite"):
        open_job(output, {"top_k": 2, "task": "fill-mask"}, overwrite=False)
    replacing = open_job(output, {"top_k": 2, "task": "fill-mask"}, overwrite=True)
    assert replacing.clear_first and (output / "part-00000-00000.parquet").exists(), "nothing is deleted before begin"
    with OutputLock(output):
        begin(replacing)
        assert sorted(path.name for path in output.iterdir()) == [LOCK_FILE, JOB_FILE]


def test_a_directory_of_other_files_or_a_damaged_job_file_is_refused(output: Path) -> None:
    (output / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="is not empty and holds no bertbatch job"):
        open_job(output, {}, overwrite=False)
    (output / "notes.txt").unlink()
    (output / JOB_FILE).write_text('{"version": 1, "ident')
    with pytest.raises(OutputConflict, match="unreadable job file"):
        open_job(output, {}, overwrite=False)
    assert open_job(output, {}, overwrite=True).clear_first


def test_a_second_writer_is_locked_out_and_told_who_holds_the_lock(output: Path) -> None:
    with OutputLock(output):
        assert (output / LOCK_FILE).read_text() == f"pid {os.getpid()}\n"
        with pytest.raises(JobLocked, match=f"locked by pid {os.getpid()}; another bertbatch run is writing this output"):
            with OutputLock(output):
                pass
    with OutputLock(output):  # released on leaving
        pass


def test_a_job_file_that_cannot_be_saved_is_an_output_error_and_the_old_one_stays(
    output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = JobState(output, {"k": 1})
    state.save()
    before = (output / JOB_FILE).read_text()

    def no_space(source: object, target: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OutputError, match=r"_bertbatch_job.json: cannot save the job file: \[Errno 28\]"):
        state.record("part-00000-00000.parquet", 3)
    with pytest.raises(OutputError, match=r"_SUCCESS: cannot write it: \[Errno 28\]"):
        write_success(state, 3, 0, "CPUExecutionProvider")
    assert (output / JOB_FILE).read_text() == before
    assert sorted(path.name for path in output.iterdir()) == [JOB_FILE]
