"""Job bookkeeping in the output directory: identity, completed shards, the lock, ``_SUCCESS``.

``_bertbatch_job.json`` records the job's parameters and every committed shard.
Running the same command again resumes; different parameters are refused
unless ``--overwrite``. ``_SUCCESS`` marks a finished job.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from worker.atomic import TEMP_MARK, remove_stale_temporaries, write_text_atomic
from worker.config import RunConfig
from worker.decode import decode_options
from worker.errors import InputError, JobLocked, OutputConflict, OutputError
from worker.modeldir.manifest import Manifest
from worker.runner import ModelDir
from worker.source import InputFile

JOB_FILE = "_bertbatch_job.json"
SUCCESS_FILE = "_SUCCESS"
LOCK_FILE = ".bertbatch.lock"
# Every name a bertbatch job writes in its output directory (shards, bookkeeping, hidden temporaries).
WRITTEN_BY_A_JOB = re.compile(rf"(part-\d{{5}}-\d{{5}}\.parquet|{re.escape(JOB_FILE)}|{SUCCESS_FILE}|{re.escape(LOCK_FILE)}|\..*{re.escape(TEMP_MARK)}.*)")


# Inputs smaller than this are identified by their content too, whatever --verify-inputs says.
CHECKSUM_BELOW_BYTES = 64 * 1024 * 1024


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: ModelDir) -> str:
    """The manifest and every file directly in the model directory, by name and content.

    Every file, not only the graph: the tokenizer and any external-data file of the graph change
    the results too, and a worker does not parse the graph to learn which files it names.
    """
    digest = hashlib.sha256(model_dir.manifest.to_json().encode())
    for path in sorted(model_dir.path.iterdir()):  # not below: an --output inside the model directory is not the model
        if path.is_file() and not path.name.startswith("."):  # hidden: temporaries, locks
            digest.update(f"\0{path.name}\0{file_digest(path)}".encode())
    return digest.hexdigest()


def input_identity(input_file: InputFile, verify: bool) -> dict[str, Any]:
    """Path, size and mtime; and the content's SHA-256 for a file under ``CHECKSUM_BELOW_BYTES`` or with ``verify``."""
    identity: dict[str, Any] = {"path": str(input_file.path.resolve()), "size": input_file.size, "mtime_ns": input_file.mtime_ns}
    if verify or input_file.size < CHECKSUM_BELOW_BYTES:
        identity["sha256"] = file_digest(input_file.path)
    return identity


def job_identity(config: RunConfig, model_dir: ModelDir, files: list[InputFile], prompt: str | None = None) -> dict[str, Any]:
    """What makes two runs the same job: everything that changes the output rows.

    ``prompt`` is the prompt the job prepends, however it was named (``--prompt``,
    ``--prompt-name`` or the model's default).
    """
    scalar = config.embedding_dtype in ("int8", "uint8")
    return {
        "model_fingerprint": model_fingerprint(model_dir),
        "task": model_dir.manifest.task,
        "text_column": config.text_column,
        "text_pair_column": config.text_pair_column,
        "id_column": config.id_column,
        "max_length": config.max_length,
        "top_k": config.top_k,
        "keep_text": config.keep_text,
        "rows_per_shard": config.rows_per_shard,
        "inputs": [input_identity(f, config.verify_inputs) for f in files],
        "chunking": config.chunking,
        "chunk_overlap": config.chunk_overlap if config.chunking != "off" else None,
        "prompt": prompt,
        "dimensions": config.dimensions,
        "embedding_dtype": config.embedding_dtype,
        "calibration_rows": config.calibration_rows if scalar and config.calibration is None else None,
        "calibration": _file_identity(config.calibration) if scalar and config.calibration is not None else None,
        **_head_identity(config, model_dir.manifest),
    }


def _file_identity(path: Path) -> dict[str, Any]:
    try:
        status = path.stat()
    except OSError as error:
        raise InputError(f"--calibration {path}: cannot read it: {error}") from error
    return {"path": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _head_identity(config: RunConfig, manifest: Manifest) -> dict[str, Any]:
    # Only for the models they apply to, so jobs of the other tasks keep the identity they always had.
    options = decode_options(config)
    if manifest.multi_label:
        return {"threshold": options.threshold}
    if manifest.task == "token-classify":
        return {"aggregation": options.aggregation, "ignore_labels": list(options.ignore_labels), "stride": config.stride}
    return {}


@dataclass
class JobState:
    output: Path
    identity: dict[str, Any]
    completed: dict[str, int] = field(default_factory=dict)  # shard name -> rows
    clear_first: bool = False  # --overwrite of a different job: cleared by ``begin``
    # int8/uint8 embedding ranges ((mins), (maxs)), decided when the job first ran: a resumed job reuses them.
    ranges: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # shard name -> "sha256:<hex>" of its file, for the shards the Ray engine's workers wrote (worker.commit).
    checksums: dict[str, str] = field(default_factory=dict)

    def save(self) -> None:
        target = self.output / JOB_FILE
        record: dict[str, Any] = {"version": 1, "identity": self.identity, "completed": self.completed, "output": str(self.output)}
        if self.ranges is not None:
            record["embedding_ranges"] = [list(self.ranges[0]), list(self.ranges[1])]
        if self.checksums:
            record["checksums"] = self.checksums
        try:
            write_text_atomic(target, json.dumps(record, indent=1, sort_keys=True))
        except OSError as error:
            raise OutputError(f"{target}: cannot save the job file: {error}") from error

    def record(self, shard_name: str, rows: int, checksum: str | None = None) -> None:
        self.completed[shard_name] = rows
        if checksum is not None:
            self.checksums[shard_name] = checksum
        else:  # written again without one: an older checksum no longer describes the file
            self.checksums.pop(shard_name, None)
        self.save()

    @property
    def success_file(self) -> Path:
        return self.output / SUCCESS_FILE


class OutputLock:
    """An exclusive, non-blocking ``flock`` on the output directory, held for the whole job.

    The lock file is opened without following a symlink and must be a regular file: whoever
    can write the output directory must not make the job truncate a file elsewhere.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / LOCK_FILE
        self._handle: IO[str] | None = None
        self.read_only = False  # the output's filesystem is read-only: nobody here can write it, no lock needed to read it

    def __enter__(self) -> OutputLock:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO does not hang the open
        try:
            descriptor = os.open(self.path, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OutputConflict(f"{self.path}: the lock file is a symlink; remove it (bertbatch never follows it)") from error
            if error.errno == errno.EROFS:
                self.read_only = True
                return self
            raise OutputError(f"{self.path}: cannot create the lock file: {error}") from error
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise OutputConflict(f"{self.path}: the lock file is not a regular file; remove it")
        self._handle = open(descriptor, "r+", encoding="utf-8")
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise JobLocked(f"{self.path.parent}: locked by {holder}; another bertbatch run is writing this output") from None
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(f"pid {os.getpid()}\n")
            self._handle.flush()
        except OSError as error:  # a full disk: the lock is held all the same, only its note is missing
            self.__exit__()
            raise OutputError(f"{self.path}: cannot write the lock file: {error}") from error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()


def open_job(output: Path, identity: dict[str, Any], overwrite: bool) -> JobState:
    """Read the job in ``output`` without changing anything (the caller holds the lock).

    Returns the state to resume, or a fresh one; ``begin`` makes it real. Refuses a
    different job unless ``overwrite``. Nothing is deleted here, so a run that fails
    before its first batch (no CUDA, a model that does not load) leaves the output as it was.
    """
    job_file = output / JOB_FILE
    if job_file.is_file():
        try:
            previous = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # written atomically, so only damaged by hand
            if not overwrite:
                raise OutputConflict(f"{job_file}: unreadable job file ({error}); use --overwrite to start the job again") from error
            previous = {}
        if previous.get("identity") == identity:
            completed = {name: rows for name, rows in previous.get("completed", {}).items() if (output / name).is_file()}
            stored = previous.get("embedding_ranges")
            ranges = (tuple(stored[0]), tuple(stored[1])) if stored else None
            checksums = {name: value for name, value in previous.get("checksums", {}).items() if name in completed}
            return JobState(output, identity, completed, ranges=ranges, checksums=checksums)
        if not overwrite:
            changed = sorted(k for k in identity if previous.get("identity", {}).get(k) != identity[k])
            raise OutputConflict(
                f"{output}: holds a different job (changed: {', '.join(changed)}); "
                "use another --output, or --overwrite to replace it"
            )
        return JobState(output, identity, clear_first=True)
    if any(p.name != LOCK_FILE and TEMP_MARK not in p.name for p in output.iterdir()):
        if not overwrite:
            raise OutputConflict(f"{output}: is not empty and holds no bertbatch job; use another --output or --overwrite")
        return JobState(output, identity, clear_first=True)
    return JobState(output, identity)


def refuse_unknown_files(state: JobState) -> None:
    """Raise ``OutputConflict`` if ``--overwrite`` would delete files no bertbatch job wrote (queued jobs)."""
    if not state.clear_first:
        return
    unknown = sorted(path.name for path in state.output.iterdir() if not WRITTEN_BY_A_JOB.fullmatch(path.name))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise OutputConflict(
            f"{state.output}: --overwrite through the queue deletes only files a bertbatch job wrote, and this output "
            f"also holds {shown}; move them, or start the worker with --overwrite-any-file"
        )


def begin(state: JobState) -> None:
    """Make the job real once work is about to start: clear a replaced job, drop stale temporaries, save."""
    if state.clear_first:
        _clear_outputs(state.output)
    remove_stale_temporaries(state.output)
    state.success_file.unlink(missing_ok=True)  # work is pending: not complete now
    state.save()


def _clear_outputs(output: Path) -> None:
    for path in output.iterdir():
        if path.name == LOCK_FILE:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as error:
            raise OutputError(f"{path}: cannot remove it for --overwrite: {error}") from error


def write_success(state: JobState, rows: int, error_rows: int, provider: str) -> None:
    """Mark the job finished: ``_SUCCESS`` with this run's counts, written atomically."""
    path = state.success_file
    record = {"rows_this_run": rows, "error_rows_this_run": error_rows, "provider": provider}
    try:
        write_text_atomic(path, json.dumps(record) + "\n")  # a reader sees a whole _SUCCESS or none
    except OSError as error:
        raise OutputError(f"{path}: cannot write it: {error}") from error
