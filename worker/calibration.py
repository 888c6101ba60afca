"""int8/uint8 ranges of a job: from its first rows, or from a Parquet of embeddings (``--calibration``).

Decided once when a job starts and stored in its job file, so a resumed job quantizes
with the same ranges; every shard also records them in its key-value metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.checks import CheckedJob
from worker.config import Device, RunConfig
from worker.embedding_format import EmbeddingFormat
from worker.errors import InputError, InputSchemaError
from worker.jobstate import JobState
from worker.modeldir.session import CUDA
from worker.output_rows import row_vectors
from worker.quantization import needs_ranges, quantization_ranges
from worker.runner import ModelDir, Runner
from worker.source import Shard
from worker.tokenize import load_tokenizer
from worker.window import LoadedModel, WindowPlan, plan_windows, prepare_shard, run_window


def with_quantization_ranges(
    config: RunConfig,
    job: CheckedJob,
    shards: Sequence[Shard],
    state: JobState,
    make_runner: Callable[[ModelDir, Device, int | None], Runner],
) -> CheckedJob:
    """The job with its int8/uint8 ranges filled in (unchanged for other precisions); ``state`` records them.

    Ranges come from the job file when the job resumes, else from ``--calibration FILE``,
    else from the embeddings of the job's first ``--calibration-rows`` rows, computed here
    with a session of their own (also for the Ray engine: a few hundred rows on this machine).
    """
    embedding = job.embedding
    if embedding is None or not needs_ranges(embedding.dtype):
        return job
    if state.ranges is not None:
        ranges = np.asarray(state.ranges, dtype=np.float32)
    elif config.calibration is not None:
        ranges = calibration_file_ranges(config.calibration, embedding)
    else:
        device: Device = config.device if config.engine == "local" else "auto"
        runner = make_runner(job.model_dir, device, config.threads)
        plan = plan_windows(config, job.model_dir.manifest, job.max_length, runner.provider == CUDA, job.text, embedding)
        ranges = sample_ranges(config.calibration_rows, plan, job, shards, runner)
    embedding = embedding.with_ranges(ranges)
    state.ranges = embedding.ranges
    return replace(job, embedding=embedding)


def calibration_file_ranges(path: Path, fmt: EmbeddingFormat) -> np.ndarray:
    """Ranges of the ``embedding`` column of a Parquet file (float lists of the model's or the output's width)."""
    try:
        column = pq.read_table(path, columns=["embedding"]).column("embedding")
    except (OSError, pa.ArrowException, KeyError) as error:
        raise InputError(f"--calibration {path}: cannot read an 'embedding' column from it: {error}") from error
    if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)) or not pa.types.is_floating(column.type.value_type):
        raise InputSchemaError(f"--calibration {path}: the 'embedding' column is {column.type}, expected lists of floats")
    rows = [vector for vector in column.to_pylist() if vector is not None]
    widths = {len(vector) for vector in rows}
    if len(rows) < 2 or len(widths) != 1 or not widths & {fmt.model_dimensions, fmt.dimensions}:
        raise InputSchemaError(
            f"--calibration {path}: needs at least 2 embeddings of {fmt.dimensions} (or the model's {fmt.model_dimensions}) "
            f"values; found {len(rows)} of widths {sorted(widths)}"
        )
    return quantization_ranges(fmt.float_vectors(np.asarray(rows, dtype=np.float32)))


def sample_ranges(wanted: int, plan: WindowPlan, job: CheckedJob, shards: Sequence[Shard], runner: Runner) -> np.ndarray:
    """Ranges of the output embeddings (after chunk means and ``--dimensions``) of the first ``wanted`` rows."""
    assert plan.embedding is not None
    tokenizer = load_tokenizer(job.model_dir.tokenizer_file, plan.tokenizer_max_length)
    model = LoadedModel(job.model_dir.manifest, runner, [])  # embeddings only: no token strings needed
    sample: list[np.ndarray] = []
    left = wanted
    for shard in shards:
        if left <= 0:
            break
        for window in prepare_shard(replace(plan, window_rows=min(plan.window_rows, left)), tokenizer, job.files[shard.file_index], shard):
            inferred = run_window(plan, model, window)
            if inferred.results.embedding is not None:
                units = replace(window.tokens, null=inferred.null)
                vectors, null = row_vectors(inferred.results.embedding, units, units.chunks, plan.chunking, window.table.num_rows, plan.embedding)
                # The input row of each output row (a chunk's row with --chunking rows): only the first ``wanted`` count.
                row_of = units.chunks.row if plan.chunking == "rows" and units.chunks is not None else np.arange(len(vectors))
                sample.append(vectors[~null & (row_of < left)])
            left -= window.table.num_rows
            if left <= 0:
                break
    found = np.concatenate(sample) if sample else np.zeros((0, plan.embedding.dimensions), np.float32)
    if len(found) < 2:
        raise InputError(
            f"--embedding-dtype {plan.embedding.dtype}: the first {wanted} rows gave {len(found)} embeddings, at least 2 "
            "are needed for ranges; raise --calibration-rows or give --calibration FILE"
        )
    return quantization_ranges(found)
