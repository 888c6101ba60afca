"""Errors raised by the exporter. Each carries the CLI exit code it maps to."""

from __future__ import annotations

from worker.exit_codes import BertbatchError, ExitCode


class ExportError(BertbatchError):
    """Base error of the exporter."""

    exit_code: ExitCode = ExitCode.MODEL_ERROR


class SourceError(ExportError):
    """The checkpoint could not be found, loaded, or is not a BERT model we can export."""


class ValidationMismatch(ExportError):
    """The ONNX model's outputs differ from PyTorch's beyond the tolerances."""

    exit_code = ExitCode.VALIDATION_FAILED


class OptimizationError(ExportError):
    """An optimization step (fusion, fp16, quantization) did not do what it must."""


class DeviceRequired(ExportError):
    """The export (or its validation) needs a device this machine lacks: packed attention runs on CUDA only."""

    exit_code = ExitCode.DEVICE_UNAVAILABLE


class TokenizerMismatch(ExportError):
    """The exported tokenizer.json gives other ids than the checkpoint's own transformers tokenizer."""

    exit_code = ExitCode.VALIDATION_FAILED
