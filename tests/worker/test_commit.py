"""The shard commit protocol (``worker.commit``) without Ray or a model: attempts, records, commits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.commit import (
    RECORD_SCHEMA,
    AttemptWriter,
    ShardRecord,
    attempt_path,
    commit_attempt,
    commit_shards,
    records_from_table,
    records_to_table,
)
from worker.errors import EngineError, OutputError, TooManyErrors
from worker.jobstate import JOB_FILE, JobState, begin, open_job

NAMES = ["part-00000-00000.parquet", "part-00000-00001.parquet", "part-00001-00000.parquet"]


def rows(start: int, count: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + count), pa.int64()), "blob": [b"x" * 1000] * count})


def written(output: Path, name: str, start: int, count: int, error_rows: int = 0) -> ShardRecord:
    """An attempt of ``name`` written in two windows and sealed."""
    writer = AttemptWriter(output, name)
    writer.write(rows(start, count // 2))
    writer.write(rows(start + count // 2, count - count // 2))
    return writer.seal(rows_read=count, error_rows=error_rows, truncated_rows=1, tokens=7 * count)


@pytest.fixture
def state(tmp_path: Path) -> JobState:
    state = open_job(tmp_path, {"job": 1}, overwrite=False)
    begin(state)
    return state


def test_an_attempt_is_hidden_durable_and_described_by_its_record(tmp_path: Path) -> None:
    record = written(tmp_path, NAMES[0], 0, 10, error_rows=2)
    path = attempt_path(tmp_path, NAMES[0], record.attempt)
    assert path.name.startswith(f".{NAMES[0]}.tmp-") and path.is_file()
    assert not (tmp_path / NAMES[0]).exists(), "a worker never makes a shard visible"
    assert (record.rows, record.error_rows, record.truncated_rows, record.tokens) == (10, 2, 1, 70)
    assert record.bytes == path.stat().st_size
    assert record.checksum == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert pq.read_table(path).column("id").to_pylist() == list(range(10))


def test_two_attempts_of_a_shard_have_different_files(tmp_path: Path) -> None:
    first, second = written(tmp_path, NAMES[0], 0, 4), written(tmp_path, NAMES[0], 0, 4)
    assert first.attempt != second.attempt
    assert len(list(tmp_path.glob(f".{NAMES[0]}.tmp-*"))) == 2


def test_a_record_is_a_few_hundred_bytes_of_arrow_whatever_the_rows_weigh(tmp_path: Path) -> None:
    record = written(tmp_path, NAMES[0], 0, 1000)  # a megabyte of rows
    table = records_to_table([record])
    assert table.schema == RECORD_SCHEMA
    assert table.nbytes < 400
    assert records_from_table(table) == [record]


def test_commit_renames_the_attempt_into_place(tmp_path: Path) -> None:
    record = written(tmp_path, NAMES[0], 0, 6)
    assert commit_attempt(tmp_path, record) == tmp_path / NAMES[0]
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[0]]
    assert pq.read_table(tmp_path / NAMES[0]).column("id").to_pylist() == list(range(6))


def test_commit_refuses_a_missing_or_torn_attempt(tmp_path: Path) -> None:
    record = written(tmp_path, NAMES[0], 0, 6)
    path = attempt_path(tmp_path, NAMES[0], record.attempt)
    with open(path, "r+b") as handle:
        handle.truncate(record.bytes - 1)
    with pytest.raises(OutputError, match="bytes, but its worker wrote"):
        commit_attempt(tmp_path, record)
    path.unlink()
    with pytest.raises(OutputError, match="storage every node shares"):
        commit_attempt(tmp_path, record)
    assert not (tmp_path / NAMES[0]).exists()


def never_stop(record: ShardRecord) -> None:
    pass


def test_shards_commit_in_the_order_they_finish_and_are_recorded_as_they_commit(state: JobState) -> None:
    out = state.output
    records = [written(out, NAMES[2], 100, 3), written(out, NAMES[0], 0, 5), written(out, NAMES[1], 5, 4)]
    seen = []
    for record in commit_shards(state, iter(records), NAMES, in_order=False, admit=never_stop):
        seen.append(record.shard)
        on_disk = json.loads((out / JOB_FILE).read_text())["completed"]
        assert on_disk == {name: {NAMES[0]: 5, NAMES[1]: 4, NAMES[2]: 3}[name] for name in seen}, "recorded as it commits"
    assert seen == [NAMES[2], NAMES[0], NAMES[1]]
    assert sorted(p.name for p in out.glob("part-*")) == sorted(NAMES)
    assert not list(out.glob(".part-*")), "every attempt was renamed"


def test_a_second_attempt_of_a_shard_is_discarded_never_a_second_copy(state: JobState) -> None:
    out = state.output
    first, again = written(out, NAMES[0], 0, 5), written(out, NAMES[0], 0, 5)
    others = [written(out, NAMES[1], 5, 4), written(out, NAMES[2], 100, 3)]
    committed = list(commit_shards(state, iter([first, again, *others]), NAMES, in_order=False, admit=never_stop))
    assert [record.shard for record in committed] == NAMES
    assert committed[0].attempt == first.attempt
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".part", "part"))) == sorted(NAMES)


def test_in_order_commits_wait_for_the_shards_before_them(state: JobState) -> None:
    out = state.output
    records = [written(out, NAMES[1], 5, 4), written(out, NAMES[2], 100, 3), written(out, NAMES[0], 0, 5)]
    order = [record.shard for record in commit_shards(state, iter(records), NAMES, in_order=True, admit=never_stop)]
    assert order == NAMES


def test_a_shard_refused_by_admit_stays_uncommitted_and_its_attempt_is_removed_by_the_next_run(state: JobState) -> None:
    out = state.output
    records = [written(out, NAMES[0], 0, 5, error_rows=1), written(out, NAMES[1], 5, 4, error_rows=3)]
    seen = 0

    def at_most_two_errors(record: ShardRecord) -> None:
        nonlocal seen
        if seen + record.error_rows > 2:
            raise TooManyErrors("too many")
        seen += record.error_rows

    with pytest.raises(TooManyErrors):
        list(commit_shards(state, iter(records), NAMES, in_order=True, admit=at_most_two_errors))
    assert [p.name for p in out.glob("part-*")] == [NAMES[0]]
    assert state.completed == {NAMES[0]: 5}
    assert len(list(out.glob(".part-*"))) == 1  # the refused attempt, until the next run starts
    rerun = open_job(out, {"job": 1}, overwrite=False)
    assert rerun.completed == {NAMES[0]: 5}
    begin(rerun)
    assert not list(out.glob(".part-*")), "the next run removes stale attempts"


def test_a_missing_shard_or_a_shard_of_another_run_is_an_engine_error(state: JobState) -> None:
    out = state.output
    with pytest.raises(EngineError, match="finished 1 of 2 shards"):
        list(commit_shards(state, iter([written(out, NAMES[0], 0, 5)]), NAMES[:2], in_order=False, admit=never_stop))
    with pytest.raises(EngineError, match="which this run does not write"):
        list(commit_shards(state, iter([written(out, NAMES[2], 0, 5)]), NAMES[:2], in_order=False, admit=never_stop))


def test_the_job_file_keeps_each_committed_shards_checksum_across_a_resume(state: JobState) -> None:
    out = state.output
    records = [written(out, NAMES[0], 0, 5), written(out, NAMES[1], 5, 4)]
    list(commit_shards(state, iter(records), NAMES[:2], in_order=False, admit=never_stop))
    stored = json.loads((out / JOB_FILE).read_text())["checksums"]
    assert stored == {name: "sha256:" + hashlib.sha256((out / name).read_bytes()).hexdigest() for name in NAMES[:2]}
    resumed = open_job(out, {"job": 1}, overwrite=False)
    assert resumed.checksums == stored
    resumed.record(NAMES[0], 5)  # written again by the local engine, which keeps no checksum
    assert json.loads((out / JOB_FILE).read_text())["checksums"] == {NAMES[1]: stored[NAMES[1]]}
