"""onnxruntime sessions: the one place that builds them, and the probe that says whether CUDA really runs.

The worker's runner, the exporter's validation and the optimizer's load check all
build their sessions here, so a model is validated under the settings it runs with
(graph optimizations, providers, logging), and the CUDA probe the exporter refuses
packed exports with is the one the worker picks its device with.
onnxruntime is imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SessionDevice = Literal["cpu", "cuda"]
# onnxruntime's own severities: 3 errors only, 4 fatal only.
ERRORS_ONLY = 3
FATAL_ONLY = 4
# A one-node ONNX model (y = Identity(x), float[1], opset 17), serialized here so the worker
# probes CUDA without the onnx package: onnx.helper.make_model(...).SerializeToString().
_PROBE_MODEL = (
    b'\x08\x08:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02'
    b'\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11'
)


def create_session(
    model: Path | bytes,
    device: SessionDevice,
    *,
    cuda_options: Mapping[str, str] | None = None,
    threads: int | None = None,
    log_severity: int = ERRORS_ONLY,
) -> InferenceSession:
    """An onnxruntime session with every graph optimization, on the CPU or on CUDA.

    On ``cuda`` the CPU provider stays behind CUDA for the operators CUDA lacks, and
    onnxruntime falls back to it silently when CUDA cannot start: callers that need
    CUDA check ``provider_of(session)``. onnxruntime's own errors (invalid graphs,
    missing files) propagate for the caller to name in its own error type.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = log_severity
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers: list[str | tuple[str, dict[str, str]]] = [CPU]
    if device == "cuda":
        providers = [(CUDA, dict(cuda_options or {})), CPU]
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=providers)


def provider_of(session: InferenceSession) -> str:
    """The provider the session runs on first: ``CUDA`` only when CUDA really started."""
    return str(session.get_providers()[0])


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """``None`` when onnxruntime really runs on CUDA here, else why not.

    onnxruntime-gpu lists its CUDA provider even on machines without a GPU, so a
    one-node model is loaded on it to find out.
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if CUDA not in available:
        return f"onnxruntime offers {', '.join(available)}: install onnxruntime-gpu"
    # The probe's failure is the answer, not news: keep onnxruntime's loader errors off stderr.
    onnxruntime.set_default_logger_severity(FATAL_ONLY)
    try:
        session = create_session(_PROBE_MODEL, "cuda", log_severity=FATAL_ONLY)
    except Exception as error:  # onnxruntime raises its own types; the reason is passed on, not dropped
        return f"onnxruntime failed to start CUDA: {error}"
    if provider_of(session) != CUDA:
        return "onnxruntime-gpu could not initialise CUDA (no GPU, driver or CUDA libraries)"
    return None


def cuda_usable() -> bool:
    return cuda_unavailable_reason() is None
