"""The configurations measured on each dataset, run one after the other in this process."""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from benchmarks import models
from benchmarks.data import Dataset
from benchmarks.measure import Kind, Measurement
from exporter.manifest import Manifest
from worker.runner import ModelDir

Device = Literal["cpu", "cuda"]
CONFIGS = ("users", "best", "packed", "worker", "ceiling")


@dataclass(frozen=True)
class Setup:
    """What every configuration shares: the checkpoint, its ONNX variants, the device, the batching."""

    checkpoint: Path
    variants: dict[str, ModelDir | str]  # a string is the error that stopped the variant's export
    manifest: Manifest
    shape: models.Shape
    device: Device
    threads: int | None
    batch_size: int
    max_tokens: int
    configs: frozenset[str]
    work: Path

    @property
    def model_dirs(self) -> dict[str, ModelDir]:
        return {name: md for name, md in self.variants.items() if isinstance(md, ModelDir)}


Job = tuple[Kind, str, str, Callable[[], Measurement]]


def jobs_for(setup: Setup, dataset: Dataset, lengths: np.ndarray) -> list[Job]:
    """The configurations to run on ``dataset`` (GPU-only ones only on CUDA), in table order."""
    from benchmarks import torch_baselines, worker_e2e

    common = (setup.checkpoint, dataset.texts, lengths, setup.manifest, setup.shape, setup.device)
    cuda = setup.device == "cuda"
    best_precision = "fp16" if cuda else "fp32"
    jobs: list[Job] = []
    if "users" in setup.configs:
        for precision in ("fp32", "fp16") if cuda else ("fp32",):
            run = partial(torch_baselines.run_users_loop, *common, precision, dataset.name)
            jobs.append(("pytorch-users", f"PyTorch as users write it ({precision})", precision, run))
    if "best" in setup.configs:
        run = partial(torch_baselines.run_best_config, *common, best_precision, dataset.name, setup.batch_size, setup.max_tokens)
        jobs.append(("pytorch-best", f"PyTorch best: SDPA, sorted batches ({best_precision})", best_precision, run))
    if "packed" in setup.configs and cuda:
        run = partial(torch_baselines.run_packed, *common, "fp16", dataset.name)
        jobs.append(("pytorch-packed", "PyTorch padding-free: flash varlen (fp16)", "fp16", run))
    for variant, model_dir in setup.variants.items():
        precision = models.precision_of(variant)
        if "worker" in setup.configs:
            run = partial(
                worker_e2e.run_worker, model_dir, dataset, lengths, setup.shape, variant, precision, setup.device,
                setup.threads, (setup.batch_size, setup.max_tokens), setup.work,
            )
            jobs.append(("worker", f"worker end to end ({variant})", precision, _unless_failed(model_dir, run)))
        if "ceiling" in setup.configs:
            run = partial(_run_ceiling, setup, model_dir, lengths, variant, precision, dataset.name)
            jobs.append(("ceiling", f"ceiling: ONNX session, fixed shapes ({variant})", precision, _unless_failed(model_dir, run)))
    return jobs


def run_dataset(setup: Setup, dataset: Dataset, lengths: np.ndarray, log: Callable[[str], None]) -> list[Measurement]:
    """Every configuration over one dataset; one that raises becomes a FAILED row (and a failed exit code)."""
    results = []
    for kind, name, precision, job in jobs_for(setup, dataset, lengths):
        log(f"[{dataset.name}] {name} ...")
        try:
            result = job()
        except Exception as error:  # printed in full here, shown as FAILED in the table, and the exit code is 1
            traceback.print_exc(file=sys.stderr)
            result = Measurement(kind, name, dataset.name, precision, error=f"{type(error).__name__}: {error}")
        if kind in ("worker", "ceiling"):
            result.extra["variant"] = name.rsplit("(", 1)[1].rstrip(")")
        outcome = f"{result.rows_per_second:,.1f} rows/s" if result.error is None else f"FAILED {result.error}"
        log(f"[{dataset.name}] {name}: {outcome}")
        results.append(result)
        _release(setup.device)
    return results


def _run_ceiling(setup: Setup, model_dir: ModelDir, lengths: np.ndarray, variant: str, precision: str, dataset: str) -> Measurement:
    from benchmarks.ceiling import run_ceiling
    from worker.runner import Runner

    runner = Runner(model_dir, setup.device, setup.threads)
    return run_ceiling(runner, lengths, setup.shape, variant, precision, dataset, setup.batch_size, setup.max_tokens)


def _unless_failed(model_dir: ModelDir | str, run: Callable[[], Measurement]) -> Callable[[], Measurement]:
    """``run``, or, for a variant whose export failed, a job that raises that failure."""
    if not isinstance(model_dir, str):
        return run

    def fail() -> Measurement:
        raise RuntimeError(model_dir)

    return fail


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
