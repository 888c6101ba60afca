"""A job: input shards -> engine (tokenize, batch, run, decode) -> output shards, resumable.

This process checks the job (``worker.checks``), holds the output lock, and commits and records
each shard (``worker.jobstate``) whichever engine computes the windows, so both share the output
layout and the resume rules: with the local engine (``worker.local_engine``) it writes the shards
itself; with the Ray engine (``worker.ray_engine``) the cluster's workers write each shard to an
attempt file and this process renames it into place (``worker.commit``). Each shard is committed
atomically and recorded in the job file, so a rerun of the same command skips what is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from worker.atomic import remove_stale_temporaries
from worker.calibration import with_quantization_ranges
from worker.checks import check_job
from worker.commit import ShardRecord, commit_shards
from worker.config import RunConfig, with_absolute_paths
from worker.errors import OutputError, TooManyErrors
from worker.jobstate import JobState, OutputLock, begin, job_identity, open_job, refuse_unknown_files, write_success
from worker.local_engine import RunnerFactory, compute_locally
from worker.runner import Runner, check_device
from worker.sink import ShardWriter
from worker.source import plan_shards
from worker.window import ComputedWindow

Progress = Callable[[int], None]


@dataclass(frozen=True)
class JobSummary:
    output: Path
    rows: int
    error_rows: int
    truncated_rows: int
    tokens: int
    seconds: float
    provider: str
    shards_written: int
    shards_skipped: int
    already_complete: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Counters:
    rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    tokens: int = 0


def run_job(
    config: RunConfig,
    progress: Progress | None = None,
    on_start: Callable[[str, int], None] | None = None,
    make_runner: RunnerFactory = Runner,
    overwrite_any_file: bool = True,
) -> JobSummary:
    """Run (or resume) a job. ``on_start(provider, rows_to_do)`` is called once the session is ready.

    ``config.engine`` picks who computes the windows: threads in this process, which writes the
    shards, or a Ray cluster (``worker.ray_engine``), whose workers write them for this process to
    commit (``worker.commit``).
    ``make_runner`` builds the local engine's onnxruntime session, only when there is work to do;
    ``bertbatch serve`` passes a cache so sessions stay warm across jobs.
    ``overwrite_any_file=False`` (queued jobs) lets ``--overwrite`` delete only files a bertbatch job wrote.
    """
    started = time.perf_counter()
    config = with_absolute_paths(config)  # `~` and relative paths resolved once: checked and used as one value
    job = check_job(config)
    if config.engine == "local" and (config.device == "cuda" or job.model_dir.manifest.cuda_only):
        # Also when there is nothing left to do: a script asking for CUDA on a machine without it learns now.
        # (Not for Ray: the cluster's nodes hold the devices, not this driver.)
        check_device(job.model_dir, config.device)
    shards = plan_shards(job.files, config.rows_per_shard)
    try:
        config.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{config.output}: cannot create the output directory: {error}") from error
    with OutputLock(config.output) as lock:
        prompt = job.text.prompt if job.text is not None else None
        state = open_job(config.output, job_identity(config, job.model_dir, job.files, prompt), config.overwrite)
        if not overwrite_any_file:
            refuse_unknown_files(state)
        pending = [shard for shard in shards if shard.name not in state.completed]
        if state.success_file.is_file() and not pending and not state.clear_first:
            return JobSummary(config.output, 0, 0, 0, 0, time.perf_counter() - started, "none", 0, len(shards), True)
        if lock.read_only:  # a finished job may be checked on a read-only filesystem; anything else needs writing
            raise OutputError(f"{config.output}: on a read-only filesystem, and the job there is not complete")
        job = with_quantization_ranges(config, job, shards, state, make_runner)
        if config.engine == "ray":
            # The cluster's workers write the shards; this process commits them (worker.commit).
            from worker.ray_engine import write_on_ray

            with write_on_ray(config, job, pending) as (provider, records):
                begin(state)  # only now that the engine is up, and before a worker writes an attempt
                if on_start:
                    on_start(provider, sum(shard.num_rows for shard in pending))
                counters = _commit_shards(config, state, records, [shard.name for shard in pending], progress)
        else:
            with compute_locally(config, job, pending, make_runner) as (provider, computed):
                begin(state)  # only now that the engine is up: a run that cannot start changes nothing
                if on_start:
                    on_start(provider, sum(shard.num_rows for shard in pending))
                counters = _write_shards(config, state, computed, progress)
        write_success(state, counters.rows, counters.error_rows, provider)
        return JobSummary(
            output=config.output,
            rows=counters.rows,
            error_rows=counters.error_rows,
            truncated_rows=counters.truncated_rows,
            tokens=counters.tokens,
            seconds=time.perf_counter() - started,
            provider=provider,
            shards_written=len(pending),
            shards_skipped=len(shards) - len(pending),
        )


def _write_shards(
    config: RunConfig, state: JobState, computed: Iterable[ComputedWindow], progress: Progress | None
) -> _Counters:
    """Write computed windows to their shards; commit and record each shard after its last window."""
    counters = _Counters()
    writer: ShardWriter | None = None
    try:
        for window in computed:
            if writer is None:
                writer = ShardWriter(config.output, window.shard.name)
            writer.write(window.table)
            _count(counters, window)
            if progress:
                progress(window.rows_read)
            if config.max_errors is not None and counters.error_rows > config.max_errors:
                raise TooManyErrors(
                    f"{counters.error_rows} rows failed, more than --max-errors {config.max_errors}; "
                    f"{len(state.completed)} finished shards are kept in {config.output}, the current one is dropped"
                )
            if window.last_of_shard:
                writer.commit()
                state.record(window.shard.name, writer.rows)
                writer = None
    finally:
        if writer is not None:
            writer.abort()
    return counters


def _commit_shards(
    config: RunConfig, state: JobState, records: Iterable[ShardRecord], shards: list[str], progress: Progress | None
) -> _Counters:
    """Commit the shards the Ray engine's workers wrote, as they finish (in input order with
    ``--max-errors``, so that a job stopped for errors keeps the shards the local engine keeps)."""
    counters = _Counters()

    def admit(record: ShardRecord) -> None:
        failed = counters.error_rows + record.error_rows
        if config.max_errors is not None and failed > config.max_errors:
            raise TooManyErrors(
                f"{failed} rows failed, more than --max-errors {config.max_errors}; "
                f"{len(state.completed)} finished shards are kept in {config.output}, the current one is dropped"
            )

    for record in commit_shards(state, records, shards, in_order=config.max_errors is not None, admit=admit):
        counters.rows += record.rows_read
        counters.error_rows += record.error_rows
        counters.truncated_rows += record.truncated_rows
        counters.tokens += record.tokens
        if progress:
            progress(record.rows_read)
    remove_stale_temporaries(state.output)  # attempts whose workers died: every shard is committed now
    return counters


def _count(counters: _Counters, window: ComputedWindow) -> None:
    counters.rows += window.rows_read
    counters.error_rows += window.error_rows
    counters.truncated_rows += window.truncated_rows
    counters.tokens += window.tokens
