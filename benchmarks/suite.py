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
from worker.modeldir.manifest import Manifest
from worker.runner import ModelDir

Device = Literal["cpu", "cuda"]
CONFIGS = ("users", "best", "packed", "worker", "ceiling", "host")


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
    repeats: int = 1

    @property
    def model_dirs(self) -> dict[str, ModelDir]:
        return {name: md for name, md in self.variants.items() if isinstance(md, ModelDir)}


@dataclass(frozen=True)
class Job:
    kind: Kind
    name: str
    precision: str
    variant: str | None  # the ONNX variant, for worker and ceiling rows
    run: Callable[[], Measurement]


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
            jobs.append(Job("pytorch-users", f"PyTorch as users write it ({precision})", precision, None, run))
    if "best" in setup.configs:
        run = partial(torch_baselines.run_best_config, *common, best_precision, dataset.name, setup.batch_size, setup.max_tokens)
        jobs.append(Job("pytorch-best", f"PyTorch best: SDPA, sorted batches ({best_precision})", best_precision, None, run))
    if "packed" in setup.configs and cuda:
        run = partial(torch_baselines.run_packed, *common, "fp16", dataset.name)
        jobs.append(Job("pytorch-packed", "PyTorch padding-free: flash varlen (fp16)", "fp16", None, run))
    for variant, model_dir in setup.variants.items():
        precision = models.precision_of(variant)
        if isinstance(model_dir, str):  # its export failed: the rows show why
            failed = partial(_raise, model_dir)
            if "worker" in setup.configs:
                jobs.append(Job("worker", f"worker end to end ({variant})", precision, variant, failed))
            if "ceiling" in setup.configs:
                jobs.append(Job("ceiling", f"ceiling: ONNX session, fixed shapes ({variant})", precision, variant, failed))
            continue
        if "worker" in setup.configs:
            run = partial(
                worker_e2e.run_worker, model_dir, dataset, lengths, setup.shape, variant, precision, setup.device,
                setup.threads, (setup.batch_size, setup.max_tokens), setup.work,
            )
            jobs.append(Job("worker", f"worker end to end ({variant})", precision, variant, run))
        if "ceiling" in setup.configs:
            run = partial(_run_ceiling, setup, model_dir, lengths, variant, precision, dataset.name)
            jobs.append(Job("ceiling", f"ceiling: ONNX session, fixed shapes ({variant})", precision, variant, run))
    if "host" in setup.configs:
        # One row: the host work does not depend on the variant (same tokenizer, same output shape).
        variant, model_dir = next(iter(setup.model_dirs.items()))
        run = partial(
            worker_e2e.run_host_pipeline, model_dir, dataset, lengths, variant, setup.device, setup.threads,
            (setup.batch_size, setup.max_tokens), setup.work,
        )
        jobs.append(Job("host", worker_e2e.HOST_NAME, "-", None, run))
    return jobs


def run_dataset(setup: Setup, dataset: Dataset, lengths: np.ndarray, log: Callable[[str], None]) -> list[Measurement]:
    """Every configuration over one dataset; with repeats, round after round, keeping each one's fastest run.

    Rounds (rather than back-to-back repeats) spread a neighbour's load over all configurations
    alike, and on a shared machine interference only ever slows a run down. A configuration that
    raises becomes a FAILED row (and a failed exit code) and is not repeated.
    """
    jobs = jobs_for(setup, dataset, lengths)
    best: list[Measurement | None] = [None] * len(jobs)
    for round_number in range(setup.repeats):
        for index, job in enumerate(jobs):
            kept = best[index]
            if kept is not None and kept.error is not None:
                continue
            log(f"[{dataset.name}] {job.name} (run {round_number + 1}/{setup.repeats}) ...")
            try:
                result = job.run()
            except Exception as error:  # printed in full here, shown as FAILED in the table, and the exit code is 1
                traceback.print_exc(file=sys.stderr)
                result = Measurement(job.kind, job.name, dataset.name, job.precision, error=f"{type(error).__name__}: {error}")
            outcome = f"{result.rows_per_second:,.1f} rows/s" if result.error is None else f"FAILED {result.error}"
            log(f"[{dataset.name}] {job.name}: {outcome}")
            if kept is None or result.error is not None or result.seconds < kept.seconds:
                best[index] = result
            _release(setup.device)
    results = [result for result in best if result is not None]
    for result, job in zip(results, jobs):
        result.extra["repeats"] = setup.repeats
        if job.variant is not None:
            result.extra["variant"] = job.variant
    return results


def _run_ceiling(setup: Setup, model_dir: ModelDir, lengths: np.ndarray, variant: str, precision: str, dataset: str) -> Measurement:
    from benchmarks.ceiling import run_ceiling
    from worker.runner import Runner

    runner = Runner(model_dir, setup.device, setup.threads)
    return run_ceiling(runner, lengths, setup.shape, variant, precision, dataset, setup.batch_size, setup.max_tokens)


def _raise(message: str) -> Measurement:
    raise RuntimeError(message)


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
