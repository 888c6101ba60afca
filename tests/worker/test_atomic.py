"""The atomic-write helper every writer goes through, and the shard writer on top of it (no model needed)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.atomic import (
    TEMP_MARK,
    atomic_path,
    remove_stale_temporaries,
    temporary_path,
    write_bytes_atomic,
    write_text_atomic,
)
from worker.errors import OutputError
from worker.sink import ShardWriter

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if TEMP_MARK in path.name)


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second, longer\n")
    assert target.read_text() == "second, longer\n"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []


def test_the_temporary_is_hidden_beside_the_target_and_named_for_the_stale_sweep(tmp_path: Path) -> None:
    temporary = temporary_path(tmp_path / "part-00000-00001.parquet")
    assert temporary.parent == tmp_path
    assert temporary.name == f".part-00000-00001.parquet{TEMP_MARK}{os.getpid()}"
    temporary.write_text("torn")
    (tmp_path / "part-00000-00000.parquet").write_text("whole")
    (tmp_path / ".bertbatch.lock").write_text("pid 1")
    remove_stale_temporaries(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".bertbatch.lock", "part-00000-00000.parquet"]


def test_the_file_and_then_its_directory_are_fsynced_around_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        real_fsync(descriptor)

    def replace(source: object, target: object) -> None:
        events.append("rename")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomic(tmp_path / "_SUCCESS", "{}\n")
    assert events == ["fsync file", "rename", "fsync directory"]


@pytest.mark.parametrize("error", [NO_SPACE, KeyboardInterrupt()], ids=["disk full", "Ctrl-C"])
def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    target = tmp_path / "job.json"
    target.write_text("old")

    def failing_replace(source: object, destination: object) -> None:
        raise error

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(type(error)):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_an_error_while_writing_through_the_path_commits_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="serializer broke"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half a mod")
            raise RuntimeError("serializer broke")
    assert not target.exists()
    assert leftovers(tmp_path) == []


def table(start: int, rows: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + rows), pa.int64()), "score": pa.array([0.5] * rows, pa.float32())})


def test_a_shard_is_invisible_until_committed_then_holds_every_written_table(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "part-00000-00000.parquet")
    writer.write(table(0, 3))
    # A later window may come with a looser schema (e.g. a column Arrow typed null): it is cast to the first one's.
    writer.write(pa.table({"id": pa.array([3, 4], pa.int64()), "score": pa.array([None, None], pa.null())}))
    assert not writer.final.exists() and writer.temporary.exists()
    assert writer.commit() == tmp_path / "part-00000-00000.parquet"
    assert writer.rows == 5
    written = pq.read_table(writer.final)
    assert written.schema == table(0, 1).schema
    assert written.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert written.column("score").to_pylist() == [0.5, 0.5, 0.5, None, None]
    assert leftovers(tmp_path) == []


def test_an_aborted_shard_leaves_nothing(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "part-00000-00000.parquet")
    writer.write(table(0, 3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_committing_an_empty_shard_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="nothing was written to this shard"):
        ShardWriter(tmp_path, "part-00000-00000.parquet").commit()


def test_a_full_disk_at_the_rename_is_an_output_error_with_nothing_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ShardWriter(tmp_path, "part-00000-00000.parquet")
    writer.write(table(0, 3))

    def failing_replace(source: object, destination: object) -> None:
        raise NO_SPACE

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match=r"part-00000-00000.parquet: write failed: \[Errno 28\] No space left on device"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_committed_with_its_files_and_itself_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.atomic import commit_directory

    staging = tmp_path / ".model.partial"
    (staging / "nested").mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"graph")
    (staging / "nested" / "vocab.txt").write_text("[PAD]")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    commit_directory(staging, tmp_path / "model")
    assert sorted(synced[:2]) == [str(staging / "model.onnx"), str(staging / "nested" / "vocab.txt")]
    assert synced[2:] == [str(staging), str(tmp_path)]  # the directory's entries, then the rename, made durable
    assert (tmp_path / "model" / "nested" / "vocab.txt").read_text() == "[PAD]" and not staging.exists()
