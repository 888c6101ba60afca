"""A job writes only where it should, knows its model and inputs by content, and exits with the documented code.

Real filesystems: symlinks and FIFOs planted in the output, ``~`` with another ``$HOME``, a model
directory inside the output, a tokenizer edited between runs, an input rewritten with its size and
mtime kept. A full disk and a read-only filesystem are injected at the one call that meets them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import worker.jobstate
from exporter.export import ExportResult
from worker.cli import app
from worker.config import RunConfig
from worker.confinement import check_confined
from worker.errors import OutputConflict, PathNotAllowed
from worker.exit_codes import ExitCode
from worker.job import run_job
from worker.jobstate import JOB_FILE, LOCK_FILE, SUCCESS_FILE


def write_texts(path: Path, texts: list[str], **extra: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **extra}), path, row_group_size=10)
    return path


def texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(["river", "stone", "light", "north", "ember"], size=6)) for _ in range(count)]


def run(model: Path, source: Path | str, output: Path | str, *extra: str) -> Any:
    return CliRunner().invoke(app, ["run", "--model", str(model), "--input", str(source), "--output", str(output),
                                    "--text-column", "text", "--rows-per-shard", "10", "--threads", "1", *extra])  # fmt: skip


@pytest.fixture
def model(tmp_path: Path, tiny_embed_export: ExportResult) -> Path:
    """A copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_embed_export.directory, tmp_path / "model"))


def test_the_lock_and_temporaries_never_write_through_a_symlink(tmp_path: Path, model: Path) -> None:
    source = write_texts(tmp_path / "in.parquet", texts(30, 1))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).symlink_to(victim)
    refused = run(model, source, output)
    assert refused.exit_code == ExitCode.OUTPUT_CONFLICT, refused.output
    assert "the lock file is a symlink" in refused.output and victim.read_text() == "precious\n"

    (output / LOCK_FILE).unlink()
    os.mkfifo(output / LOCK_FILE)  # would hang an open without O_NONBLOCK
    refused = run(model, source, output)
    assert refused.exit_code == ExitCode.OUTPUT_CONFLICT and "not a regular file" in refused.output
    (output / LOCK_FILE).unlink()

    # The temporaries' names are predictable (the pid): planted symlinks are replaced, never followed.
    for name in ("part-00000-00000.parquet", JOB_FILE, SUCCESS_FILE):
        (output / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    done = run(model, source, output)
    assert done.exit_code == 0, done.output
    assert victim.read_text() == "precious\n" and (output / SUCCESS_FILE).is_file()
    assert pq.read_table(output / "part-00000-00000.parquet").num_rows == 10


def test_overwrite_never_deletes_the_model_or_unknown_files_of_a_queued_job(tmp_path: Path, model: Path) -> None:
    source = write_texts(tmp_path / "data" / "in.parquet", texts(20, 2))
    volume = tmp_path / "volume"
    inner_model = Path(shutil.copytree(model, volume / "models" / "m"))
    (volume / "sibling-output.txt").write_text("another job's\n")
    refused = run(inner_model, source, volume, "--overwrite")
    assert refused.exit_code == ExitCode.USAGE_ERROR, refused.output
    assert "contains the model directory" in refused.output
    assert (inner_model / "model.onnx").is_file() and (volume / "sibling-output.txt").is_file()

    output = tmp_path / "out"
    assert run(model, source, output).exit_code == 0
    (output / "notes.txt").write_text("mine\n")
    other = write_texts(tmp_path / "data2" / "in.parquet", texts(20, 3))
    config = RunConfig(model_dir=model, input=str(other), output=output, text_column="text", rows_per_shard=10, threads=1, overwrite=True)
    with pytest.raises(OutputConflict, match="also holds notes.txt"):
        run_job(config, overwrite_any_file=False)  # what `serve` does unless --overwrite-any-file
    assert (output / "notes.txt").is_file() and json.loads((output / JOB_FILE).read_text())["identity"]["inputs"][0]["path"] == str(source)
    (output / "notes.txt").unlink()
    assert run_job(config, overwrite_any_file=False).rows == 20  # shards, job file and _SUCCESS are a job's: replaced


def test_a_tilde_is_expanded_once_and_the_expanded_path_is_checked_and_used(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    source = write_texts(home / "in.parquet", texts(15, 4))
    done = run(model, "~/in.parquet", "~/out")
    assert done.exit_code == 0, done.output
    assert (home / "out" / SUCCESS_FILE).is_file() and list(cwd.iterdir()) == []
    assert json.loads((home / "out" / JOB_FILE).read_text())["output"] == str(home / "out")
    # A queued spec naming `~/x`: confinement checks the expanded path, and the run uses that same path.
    spec_like = RunConfig(model_dir=model, input=str(source), output=Path("~/x"), text_column="text")
    with pytest.raises(PathNotAllowed, match=str(home / "x")):
        check_confined(spec_like, [tmp_path / "model", tmp_path / "cwd"])


def test_the_tokenizer_and_every_model_file_are_part_of_the_job_identity(tmp_path: Path, model: Path) -> None:
    source = write_texts(tmp_path / "in.parquet", texts(20, 5))
    output = tmp_path / "out"
    assert run(model, source, output).exit_code == 0
    assert run(model, source, output).exit_code == 0  # the same command: a no-op
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # the same model, other token ids
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    changed = run(model, source, output)
    assert changed.exit_code == ExitCode.OUTPUT_CONFLICT and "changed: model_fingerprint" in changed.output
    assert run(model, source, tmp_path / "out2").exit_code == 0
    (model / "model.onnx.data").write_bytes(b"external weights")
    assert run(model, source, tmp_path / "out2").exit_code == ExitCode.OUTPUT_CONFLICT


def test_inputs_are_identified_by_content(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_texts(tmp_path / "in.parquet", texts(20, 6))
    output = tmp_path / "out"
    assert run(model, source, output).exit_code == 0
    before = source.stat()

    def rewrite() -> None:  # the same size and mtime, other rows
        data = bytearray(source.read_bytes())
        position = data.find(b"river")
        data[position : position + 5] = b"stone"
        source.write_bytes(bytes(data))
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert source.stat().st_size == before.st_size

    rewrite()
    changed = run(model, source, output)
    assert changed.exit_code == ExitCode.OUTPUT_CONFLICT and "changed: inputs" in changed.output
    # Above the size limit only --verify-inputs reads the content.
    monkeypatch.setattr(worker.jobstate, "CHECKSUM_BELOW_BYTES", 0)
    fresh = write_texts(tmp_path / "big" / "in.parquet", texts(20, 7))
    before = fresh.stat()
    for flags, code in (((), ExitCode.OK), (("--verify-inputs",), ExitCode.OK)):
        assert run(model, fresh, tmp_path / f"out-{len(flags)}", *flags).exit_code == code
    source = fresh
    rewrite()
    assert run(model, fresh, tmp_path / "out-0").exit_code == ExitCode.OK  # size and mtime only: not seen (documented)
    verified = run(model, fresh, tmp_path / "out-1", "--verify-inputs")
    assert verified.exit_code == ExitCode.OUTPUT_CONFLICT and "changed: inputs" in verified.output


def test_documented_exit_codes_where_there_was_an_internal_error(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    duplicate = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), duplicate)
    result = run(model, duplicate, tmp_path / "out-dup")
    assert result.exit_code == ExitCode.INPUT_ERROR and "column 'text' (--text-column) appears 2 times" in result.output

    source = write_texts(tmp_path / "in.parquet", texts(10, 8))
    manifest = json.loads((model / "bertbatch.json").read_text())
    for broken, message in (([manifest], "expected a JSON object"), ({**manifest, "task": "summarize"}, "task 'summarize'"),
                            ({**manifest, "embedding_dim": "wide"}, "embedding_dim 'wide'"),
                            ({**manifest, "embedding_dim": manifest["embedding_dim"] + 1}, f"embedding_dim {manifest['embedding_dim'] + 1}, the graph's embedding has")):  # fmt: skip
        (model / "bertbatch.json").write_text(json.dumps(broken))
        result = run(model, source, tmp_path / "out-manifest")
        assert result.exit_code == ExitCode.MODEL_ERROR and message in result.output, result.output
    (model / "bertbatch.json").write_text(json.dumps(manifest))

    real_open = open

    class FullDisk:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(worker.jobstate, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
        result = run(model, source, tmp_path / "out-full")
    assert result.exit_code == ExitCode.OUTPUT_ERROR and "cannot write the lock file" in result.output, result.output

    output = tmp_path / "out"
    assert run(model, source, output).exit_code == 0
    real_os_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *args)

    with monkeypatch.context() as patch:
        patch.setattr(worker.jobstate.os, "open", read_only)
        finished = run(model, source, output)
        (output / SUCCESS_FILE).unlink()
        unfinished = run(model, source, output)
    assert finished.exit_code == 0, finished.output  # the documented no-op
    assert unfinished.exit_code == ExitCode.OUTPUT_ERROR and "read-only" in unfinished.output
