"""Atomic file writes: a hidden temporary file in the same directory, fsync, rename, fsync the directory.

Every file bertbatch writes for a reader to trust (result shards, the job file, ``_SUCCESS``,
a model directory's manifest, an optimized model, and the exported model directory itself)
goes through here, so a reader (or a resumed job) sees the whole old file or the whole new
one, never a torn one, even after a power loss. A crash leaves at most a hidden
``.NAME.tmp-PID`` file, which ``remove_stale_temporaries`` deletes.

Errors are ``OSError``; the callers turn them into their package's own error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"


def temporary_path(final: Path) -> Path:
    """The hidden temporary file ``final`` is written to before ``commit`` renames it."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit(temporary: Path, final: Path) -> None:
    """Make the fully written ``temporary`` visible as ``final``: fsync it, rename it over ``final``, fsync the directory."""
    fsync_file(temporary)
    os.replace(temporary, final)
    fsync_directory(final.parent)


def commit_directory(staging: Path, final: Path) -> None:
    """Make a fully written directory visible as ``final`` (which must not exist): fsync its files and itself,
    rename it, fsync the parent. A crash leaves the staging directory or the whole ``final``, never a ``final``
    whose files were still in the page cache."""
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    fsync_directory(staging)
    staging.rename(final)
    fsync_directory(final.parent)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``final`` through (for writers that take a path, such as onnx or pyarrow).

    On a normal exit the file is committed; on any exception (``KeyboardInterrupt`` too) it is removed.
    """
    temporary = temporary_path(final)
    temporary.unlink(missing_ok=True)  # a file (or symlink) left under this name is never written through
    try:
        yield temporary
        commit(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)  # gone after a commit; after a failure, never left half written


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically and durably."""
    with atomic_path(final) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically and durably."""
    write_bytes_atomic(final, text.encode("utf-8"))


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporaries a crashed writer left in ``directory``."""
    for stale in directory.glob(f".*{TEMP_MARK}*"):
        stale.unlink(missing_ok=True)
