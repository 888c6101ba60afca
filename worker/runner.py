"""The onnxruntime session: provider choice (CUDA or CPU) and running padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.manifest import MANIFEST_NAME, Manifest, read_manifest
from worker.batching import PaddedBatch
from worker.config import Device
from worker.errors import DeviceUnavailable, ModelDirError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelDir:
    path: Path
    manifest: Manifest

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def tokenizer_file(self) -> Path:
        return self.path / self.manifest.tokenizer_file


def open_model_dir(path: Path) -> ModelDir:
    """Read and check a model directory written by ``bertbatch export``."""
    if not (path / MANIFEST_NAME).is_file():
        raise ModelDirError(f"{path}: no {MANIFEST_NAME}; export a model with `bertbatch export` first")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelDirError(f"{path}/{MANIFEST_NAME}: unreadable manifest: {error}") from error
    if not manifest.validated:
        raise ModelDirError(f"{path}: this export did not pass validation against PyTorch; re-export it")
    model_dir = ModelDir(path, manifest)
    for required in (model_dir.model_file, model_dir.tokenizer_file):
        if not required.is_file():
            raise ModelDirError(f"{path}: {required.name} is missing")
    return model_dir


class Runner:
    """One onnxruntime session, loaded once, run batch after batch."""

    def __init__(self, model_dir: ModelDir, device: Device, threads: int | None = None) -> None:
        import onnxruntime

        # Quiet the CUDA probe on machines without CUDA libraries: the outcome is reported below.
        onnxruntime.set_default_logger_severity(4)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        available = onnxruntime.get_available_providers()
        want_cuda = device in ("auto", "cuda") and CUDA in available
        if device == "cuda" and not want_cuda:
            raise DeviceUnavailable(
                f"--device cuda: onnxruntime has no CUDA execution provider (available: {', '.join(available)}); "
                "install onnxruntime-gpu with a matching CUDA, or use --device cpu"
            )
        providers: list[str | tuple[str, dict[str, str]]] = [CPU]
        if want_cuda:
            # Grow the arena only by what is asked for, so varied shapes do not balloon device memory.
            providers = [(CUDA, {"arena_extend_strategy": "kSameAsRequested"}), CPU]
        try:
            self.session = onnxruntime.InferenceSession(str(model_dir.model_file), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelDirError(f"{model_dir.model_file}: onnxruntime cannot load it: {error}") from error
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise DeviceUnavailable(
                "--device cuda: onnxruntime could not initialise CUDA (no GPU, driver or CUDA libraries); "
                "use --device cpu or --device auto"
            )
        self.output_names = list(model_dir.manifest.outputs)

    def run(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
