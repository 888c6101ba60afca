"""The worker end to end: ``worker.job.run_job`` from the Parquet file to result Parquet shards.

Timed from the moment the onnxruntime session is ready (``on_start``) to the return of
``run_job``: Parquet read, tokenizing, batching, inference, decoding and the atomic
Parquet write are all inside; loading the model is not (nor is it for the PyTorch
rows). The full job time, session start included, is kept in the row's ``extra``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.data import ID_COLUMN, TEXT_COLUMN, Dataset
from benchmarks.measure import Measurement
from benchmarks.models import Shape
from worker.config import Device, RunConfig
from worker.job import run_job
from worker.runner import ModelDir


def run_worker(
    model_dir: ModelDir, dataset: Dataset, lengths: np.ndarray, shape: Shape, variant: str, precision: str,
    device: Device, threads: int | None, batching: tuple[int, int], work: Path,
) -> Measurement:
    output = work / f"{dataset.name}-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    config = RunConfig(
        model_dir=model_dir.path, input=str(dataset.path), output=output, text_column=TEXT_COLUMN,
        device=device, threads=threads, batch_size=batching[0], max_tokens=batching[1],
    )
    ready: list[float] = []
    summary = run_job(config, on_start=lambda provider, rows: ready.append(time.perf_counter()))
    finished = time.perf_counter()
    result = Measurement("worker", f"worker end to end ({variant})", dataset.name, precision)
    result.seconds = finished - ready[0]
    result.rows = summary.rows
    result.tokens = summary.tokens
    result.useful_flops = shape.flops(lengths)
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
    result.embeddings = read_embeddings(output, len(lengths))
    return result


def read_embeddings(output: Path, rows: int) -> np.ndarray:
    """The ``embedding`` column of a job's output, in the input's ``id`` order."""
    table = pq.read_table(output).sort_by(ID_COLUMN)
    column = table.column("embedding").combine_chunks()
    vectors = np.asarray(column.flatten(), dtype=np.float32)
    return vectors.reshape(rows, -1)
