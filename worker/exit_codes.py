"""The exit codes of the `bertbatch` CLI: a contract scripts rely on. Documented in README.md.

Also the root of both packages' errors, so the CLI maps an error to its code without importing the exporter.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL_ERROR = 1
    USAGE_ERROR = 2
    INPUT_ERROR = 3
    MODEL_ERROR = 4
    VALIDATION_FAILED = 5
    DEVICE_UNAVAILABLE = 6
    PARTIAL = 7
    LOCKED = 8
    OUTPUT_CONFLICT = 9
    OUTPUT_ERROR = 10
    PATH_NOT_ALLOWED = 11
    QUEUE_ERROR = 12
    ENGINE_ERROR = 13
    INTERRUPTED = 130


class BertbatchError(Exception):
    """The root of ``ExportError`` and ``WorkerError``: an error the CLI prints as one line and exits with."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR
