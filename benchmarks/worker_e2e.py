"""The worker end to end: ``worker.job.run_job`` from the Parquet file to result Parquet shards.

Timed from the moment the onnxruntime session is ready (``on_start``) to the return of
``run_job``: Parquet read, tokenizing, batching, inference, decoding and the atomic
Parquet write are all inside; loading the model is not (nor is it for the PyTorch
rows). The full job time, session start included, is kept in the row's ``extra``.

The host row runs the same job with the model call replaced by ``StubRunner``: what is
left is the host pipeline alone, the most rows/s the worker could reach with an
infinitely fast device.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.data import ID_COLUMN, TEXT_COLUMN, Dataset
from benchmarks.measure import Measurement
from benchmarks.models import Shape
from worker.batching import PaddedBatch
from worker.config import Device, RunConfig
from worker.job import run_job
from worker.modeldir.session import CPU, CUDA
from worker.runner import ModelDir, Runner

HOST_NAME = "worker host pipeline, model stubbed"


class StubRunner(Runner):
    """Stands in for the onnxruntime session: zeros of the manifest's output shapes, no model call.

    A ``Runner`` subclass only because ``run_job``'s ``make_runner`` is typed to return one; it
    opens no session. ``provider`` is the real device's, so the job picks the same batch limits
    as the real worker row.
    """

    def __init__(self, model_dir: ModelDir, device: Device, threads: int | None = None) -> None:  # no session: no super()
        manifest = model_dir.manifest
        if manifest.task != "embed" or manifest.token_embeddings or not manifest.embedding_dim:
            raise ValueError(
                f"{model_dir.path}: the stubbed model returns pooled embeddings only; this export is a {manifest.task} "
                f"export{' with token embeddings' if manifest.token_embeddings else ''}; benchmark an embed export"
            )
        self.provider = CUDA if device == "cuda" else CPU
        self.output_names = list(manifest.outputs)
        self.embedding_dim = manifest.embedding_dim

    def run(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        return {"embedding": np.zeros((len(batch.rows), self.embedding_dim), dtype=np.float32)}


def run_worker(
    model_dir: ModelDir, dataset: Dataset, lengths: np.ndarray, shape: Shape, variant: str, precision: str,
    device: Device, threads: int | None, batching: tuple[int, int], work: Path,
) -> Measurement:
    output = work / f"{dataset.name}-{variant}"
    config = _job_config(model_dir, dataset, output, device, threads, batching)
    result = _run_timed(config, Runner, Measurement("worker", f"worker end to end ({variant})", dataset.name, precision), lengths)
    result.useful_flops = shape.flops(lengths)
    result.embeddings = read_embeddings(output, len(lengths))
    return result


def run_host_pipeline(
    model_dir: ModelDir, dataset: Dataset, lengths: np.ndarray, variant: str, device: Device, threads: int | None,
    batching: tuple[int, int], work: Path,
) -> Measurement:
    """The worker's job with ``StubRunner`` for the model: read, tokenize, batch, decode, write.

    No embeddings (they are zeros) and no FLOPs; ``variant`` names the export whose manifest
    and tokenizer it used.
    """
    config = _job_config(model_dir, dataset, work / f"{dataset.name}-host", device, threads, batching)
    result = _run_timed(config, StubRunner, Measurement("host", HOST_NAME, dataset.name, "-"), lengths)
    result.extra["stubbed_variant"] = variant
    return result


def _job_config(
    model_dir: ModelDir, dataset: Dataset, output: Path, device: Device, threads: int | None, batching: tuple[int, int]
) -> RunConfig:
    shutil.rmtree(output, ignore_errors=True)
    return RunConfig(
        model_dir=model_dir.path, input=str(dataset.path), output=output, text_column=TEXT_COLUMN,
        device=device, threads=threads, batch_size=batching[0], max_tokens=batching[1],
    )


def _run_timed(
    config: RunConfig, make_runner: Callable[[ModelDir, Device, int | None], Runner], result: Measurement, lengths: np.ndarray
) -> Measurement:
    """Run the job, timed from session ready to return, and check it did every row and token."""
    ready: list[float] = []
    summary = run_job(config, on_start=lambda provider, rows: ready.append(time.perf_counter()), make_runner=make_runner)
    finished = time.perf_counter()
    result.seconds = finished - ready[0]
    result.rows = summary.rows
    result.tokens = summary.tokens
    result.extra.update(
        provider=summary.provider,
        job_seconds_with_session_start=summary.seconds,
        truncated_rows=summary.truncated_rows,
        error_rows=summary.error_rows,
    )
    if summary.rows != len(lengths) or summary.tokens != int(lengths.sum()) or summary.error_rows:
        result.error = (
            f"the worker processed {summary.rows} rows / {summary.tokens} tokens with {summary.error_rows} errors; "
            f"expected {len(lengths)} rows / {int(lengths.sum())} tokens and no errors"
        )
    return result


def read_embeddings(output: Path, rows: int) -> np.ndarray:
    """The ``embedding`` column of a job's output, in the input's ``id`` order."""
    table = pq.read_table(output).sort_by(ID_COLUMN)
    column = table.column("embedding").combine_chunks()
    vectors = np.asarray(column.flatten(), dtype=np.float32)
    return vectors.reshape(rows, -1)
