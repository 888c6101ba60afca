"""Errors raised by the worker. Each carries the CLI exit code it maps to."""

from __future__ import annotations

from worker.exit_codes import BertbatchError, ExitCode


class WorkerError(BertbatchError):
    """Base error of the worker."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


class UsageError(WorkerError):
    """Options that contradict each other or the model."""

    exit_code = ExitCode.USAGE_ERROR


class InputError(WorkerError):
    """An input file is missing, unreadable, or lacks a column."""

    exit_code = ExitCode.INPUT_ERROR


class InputSchemaError(InputError):
    """A column is missing or has the wrong type."""


class ModelDirError(WorkerError):
    """The model directory is missing, incomplete, or was never validated."""

    exit_code = ExitCode.MODEL_ERROR


class InferenceBroken(ModelDirError):
    """The model failed on every row of a window: the device or the model is broken, not the rows."""


class DeviceUnavailable(WorkerError):
    """``--device cuda`` was asked for and onnxruntime cannot use CUDA."""

    exit_code = ExitCode.DEVICE_UNAVAILABLE


class OutputConflict(WorkerError):
    """The output directory holds a different job."""

    exit_code = ExitCode.OUTPUT_CONFLICT


class OutputError(WorkerError):
    """Writing the output failed (disk full, permissions)."""

    exit_code = ExitCode.OUTPUT_ERROR


class JobLocked(WorkerError):
    """Another process is writing the same output directory."""

    exit_code = ExitCode.LOCKED


class TooManyErrors(WorkerError):
    """More rows failed than ``--max-errors`` allows; finished shards are kept."""

    exit_code = ExitCode.PARTIAL


class PathNotAllowed(WorkerError):
    """A queued job's model, input or output lies outside every ``--allow-root``."""

    exit_code = ExitCode.PATH_NOT_ALLOWED


class QueueError(WorkerError):
    """The job queue (Redis) is unreachable, or its URL is not a Redis URL."""

    exit_code = ExitCode.QUEUE_ERROR


class UnknownJob(WorkerError):
    """``bertbatch status JOB``: no such job in the queue."""

    exit_code = ExitCode.USAGE_ERROR


class EngineError(WorkerError):
    """``--engine ray``: the cluster is unreachable or was lost, or a window failed all its retries."""

    exit_code = ExitCode.ENGINE_ERROR
