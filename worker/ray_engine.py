"""The Ray engine (``--engine ray``): shards computed and written on a Ray cluster, committed by this process.

Rows never pass through this process (the driver). A Ray Data pipeline with one row per shard::

    pending shards -> tokenize (CPU tasks): read the shard's text columns window by window, tokenize
                      each window; hand on one Arrow row of tokens per shard (``worker.shard_tokens``)
                   -> write (an actor pool; each actor holds one onnxruntime session): read the shard's
                      rows again window by window, run and decode each window with the tokens
                      (``worker.window.compute_window``), append it to the shard's attempt file
                      (``worker.commit.AttemptWriter``); hand on a commit record of a few hundred bytes
                   -> this process: rename each attempt into place and record the shard in the job
                      file, in the order shards finish (``worker.commit.commit_shards``)

Why one row per shard, and why the writer reads the rows itself. A shard is the unit a worker
writes and the driver commits, so the stage that writes must see all of a shard's windows, in
order; Ray Data routes blocks to whichever actor is free, so a pipeline of one row per window
would scatter a shard over actors. One row per shard keeps a shard on one actor, but a shard's
rows can be wide (passthrough columns of kilobytes a row, 100k rows a shard): moved as a block
they would cost memory per shard in every object store they cross. So only the tokens move
(a few bytes a token: bounded by ``--rows-per-shard`` x ``--max-length``, whatever the rows
weigh); the writing actor streams the shard's rows from the input (which every node reads
anyway) one window at a time, so an actor holds one window of rows and one shard of tokens.
Memory is bounded by Ray Data's backpressure on the token blocks (its object store budget per
operator, and at most ``SHARDS_QUEUED_PER_ACTOR`` shards queued per actor), never by the dataset's
size. The price: the text columns are read twice (by the tokenizer, and by the writer with the rest
of the row), which costs little beside tokenizing them. The alternative, one row per window with the
rows in the blocks and a stage that regroups windows by shard, would need an all-to-all shuffle
(which Ray Data materializes) or move every byte of every row through the object store.

The windows an actor computes are the local engine's (the same reader, window size and window
functions, ``worker.window``): same tokens, same batches, same numbers, and the same output
layout; the job identity and the resume rules are the job's (``worker.job``), so a job started
with one engine is finished by the other.

Faults: an actor that dies (SIGKILL, a lost node) is restarted and its shards are retried, each
retry writing a new attempt file; an attempt whose worker died leaves a hidden temporary file,
removed at the end of the run or by the next run. Only the driver renames, once per shard, so a
shard never has two copies. If the driver dies, committed shards stay and a rerun resumes.

``ray`` is imported inside functions only, so ``bertbatch --help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from worker.checks import CheckedJob
from worker.commit import AttemptWriter, ShardRecord, records_from_table, records_to_table
from worker.config import Device, RunConfig
from worker.decode import vocabulary_of
from worker.errors import DeviceUnavailable, EngineError, UsageError, WorkerError
from worker.pipeline import in_background
from worker.process_guard import watch_new_processes
from worker.modeldir.session import CPU, CUDA
from worker.runner import Runner, open_model_dir
from worker.shard_tokens import WindowTokens, shard_from_arrow, shard_to_arrow
from worker.source import InputFile, Shard, read_shard
from worker.tokenize import load_tokenizer
from worker.window import LoadedModel, WindowPlan, batch_window, compute_window, plan_windows, tokenize_table

# An actor that dies is restarted (a lost node, an OOM kill) and the shards it held are retried
# until they finish, as Ray Data does by default. A bound would be spent by a node's death: the
# driver's calls to an actor whose node is gone fail fast ("actor unavailable") until the cluster
# notices, and each failure counts. (Tokenizing tasks keep Ray Data's default too.)
SHARD_RETRIES = -1
# Shards queued on an actor beyond the one it writes: enough to keep it busy, few to hold tokens for.
SHARDS_QUEUED_PER_ACTOR = 2


@dataclass(frozen=True)
class WorkerPlan:
    """What each Ray worker (an inference actor) reserves and runs on."""

    cpus: float
    gpus: float
    device: Device  # "cuda" when the actor holds GPUs (CUDA is then required), else "cpu"
    threads: int | None

    @property
    def provider(self) -> str:
        return CUDA if self.gpus else CPU


@contextmanager
def write_on_ray(config: RunConfig, job: CheckedJob, shards: list[Shard]) -> Iterator[tuple[str, Iterator[ShardRecord]]]:
    """The Ray engine: yields ``(provider, records of the shards written, as they finish)``.

    Each record names an attempt file in ``config.output`` for the caller to commit
    (``worker.commit.commit_shards``). Nothing runs until the records are iterated, so the
    caller may clear stale attempts first. Joins ``config.ray_address``, or the Ray runtime
    this process already runs, or starts a local one (shut down on leaving).
    """
    with _ray_runtime(config):
        workers = plan_workers(config)
        plan = plan_windows(config, job.model_dir.manifest, job.max_length, workers.gpus > 0, job.text, job.embedding)
        dataset = _build_dataset(config, plan, job, shards, workers)
        provider = f"{workers.provider} on {config.num_workers} Ray workers"
        records = _records(dataset)
        try:
            yield provider, records
        finally:
            records.close()  # stops the Ray Data execution when leaving early


def plan_workers(config: RunConfig) -> WorkerPlan:
    """Resources per actor, checked against the cluster's so that a job never waits forever."""
    import ray

    resources = ray.cluster_resources()
    cluster_cpus, cluster_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    workers = config.num_workers
    gpus = config.gpus_per_worker
    if gpus is None:  # auto: a GPU per worker when the cluster has GPUs
        gpus = 1.0 if config.device != "cpu" and cluster_gpus > 0 else 0.0
    if config.device == "cuda" and not gpus:
        raise DeviceUnavailable("--device cuda: the Ray cluster has no GPUs; use --device cpu or --device auto")
    if gpus * workers > cluster_gpus:
        raise DeviceUnavailable(
            f"--num-workers {workers} x --gpus-per-worker {gpus:g} needs {gpus * workers:g} GPUs; "
            f"the Ray cluster has {cluster_gpus:g}: lower --num-workers or --gpus-per-worker"
        )
    # A CPU worker's onnxruntime threads are the CPUs it reserves, so workers do not oversubscribe a node.
    cpus = 1.0 if gpus else float(config.threads or 1)
    if cpus * workers + 1 > cluster_cpus:
        raise UsageError(
            f"the Ray cluster has {cluster_cpus:g} CPUs: {workers} workers x {cpus:g} CPUs leave none for reading "
            "and tokenizing; lower --num-workers (or --threads), or add nodes"
        )
    threads = config.threads if gpus else int(cpus)
    return WorkerPlan(cpus=cpus, gpus=gpus, device="cuda" if gpus else "cpu", threads=threads)


@contextmanager
def _ray_runtime(config: RunConfig) -> Iterator[None]:
    try:
        import ray
    except ImportError as error:
        raise UsageError("--engine ray needs Ray: pip install 'bertbatch[ray]'") from error
    address = config.ray_address
    if ray.is_initialized():  # the calling application already runs Ray: use its runtime, leave it running
        if address is not None:
            raise UsageError(f"--ray-address {address}: this process is already connected to a Ray cluster")
        yield
        return
    with ExitStack() as runtime:
        try:
            if address is None:
                # Logical CPUs for the workers and one reading stage even on a machine with fewer cores:
                # they share the cores, where a cluster of real CPUs would leave the job waiting forever.
                cpus = max(os.cpu_count() or 1, config.num_workers * (config.threads or 1) + 1)
                # The runtime this process starts must not outlive it, even when it is SIGKILLed.
                runtime.enter_context(watch_new_processes(functools.partial(ray.init, num_cpus=cpus, include_dashboard=False, log_to_driver=True)))
            else:
                ray.init(address=address, log_to_driver=True)
        except ConnectionError as error:
            raise EngineError(f"--ray-address {address}: cannot connect to a Ray cluster: {error}") from error
        try:
            yield
        finally:
            ray.shutdown()


def _build_dataset(config: RunConfig, plan: WindowPlan, job: CheckedJob, shards: list[Shard], workers: WorkerPlan) -> Any:
    import ray

    # Workers on other nodes have another working directory: give them absolute paths.
    files = [replace(input_file, path=input_file.path.absolute()) for input_file in job.files]
    tokenize = functools.partial(
        _tokenize_shards, plan=plan, files=files, shards=shards, tokenizer_file=job.model_dir.tokenizer_file.absolute()
    )
    tokenized = ray.data.range(len(shards), override_num_blocks=max(1, len(shards))).map_batches(
        tokenize, batch_size=None, batch_format="pyarrow", num_cpus=1
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these keyword arguments and names no replacement yet; pyproject caps Ray below 2.64.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = tokenized.map_batches(
            _ShardWriterActor,
            fn_constructor_args=(plan, job.model_dir.path.absolute(), config.output.absolute(), files, shards, workers),
            batch_size=1,  # one row, one shard
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.num_workers, max_tasks_in_flight_per_actor=SHARDS_QUEUED_PER_ACTOR),
            num_cpus=workers.cpus,
            num_gpus=workers.gpus,
            max_restarts=-1,
            max_task_retries=SHARD_RETRIES,
        )
    context = dataset.context
    context.execution_options.preserve_order = False  # shards commit as they finish
    context.enable_progress_bars = False  # the CLI draws its own
    # A UDF's own error (e.g. a model directory that a node cannot see) rather than a wrapper.
    context.raise_original_map_exception = True
    return dataset


def _records(dataset: Any) -> Generator[ShardRecord, None, None]:
    """The commit records of the dataset's shards, as they finish: all that reaches this process."""
    import ray

    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from records_from_table(batch)
    except ray.exceptions.RayError as error:
        raise _worker_error_in(error) or EngineError(
            f"the Ray engine failed: {type(error).__name__}: {error}; finished shards are kept, run again to resume"
        ) from error


def _worker_error_in(error: BaseException) -> WorkerError | None:
    """The worker's own error that made a Ray task or actor fail, if one did."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, WorkerError):
            return type(cause)(str(cause))
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


@functools.lru_cache(maxsize=2)
def _tokenizer(path: Path, max_length: int | None, stride: int) -> Any:
    # Ray reuses worker processes: load a tokenizer once per process, not once per shard.
    return load_tokenizer(path, max_length, stride)


def _tokenize_shards(
    batch: pa.Table, *, plan: WindowPlan, files: list[InputFile], shards: list[Shard], tokenizer_file: Path
) -> Iterator[pa.Table]:
    """Stage 1 (a Ray task per shard): read a shard's text columns window by window and tokenize them."""
    tokenizer = _tokenizer(tokenizer_file, plan.tokenizer_max_length, plan.stride or 0)
    for position in batch.column("id").to_pylist():
        shard = shards[position]
        windows = [
            WindowTokens(*tokenize_table(plan, tokenizer, table), rows=table.num_rows)
            for table in read_shard(files[shard.file_index], shard, plan.window_rows, columns=plan.text_columns)
        ]
        yield shard_to_arrow(position, windows)


class _ShardWriterActor:
    """Stage 2 (a Ray actor): one onnxruntime session, loaded once, computes and writes shard after shard."""

    def __init__(self, plan: WindowPlan, model_path: Path, output: Path, files: list[InputFile], shards: list[Shard], workers: WorkerPlan) -> None:
        self.plan, self.output, self.files, self.shards = plan, output, files, shards
        # Ray hands a task's exception back to the driver as itself, but (in some versions) a
        # constructor's only as text: a worker that cannot load its model fails its first shard.
        self.failure: WorkerError | None = None
        try:
            model_dir = open_model_dir(model_path)  # on this node: the model must be on shared storage
            runner = Runner(model_dir, workers.device, workers.threads)
            tokenizer = load_tokenizer(model_dir.tokenizer_file, plan.max_length)
        except WorkerError as error:
            self.failure = error
            return
        self.model = LoadedModel(model_dir.manifest, runner, vocabulary_of(tokenizer, tokenizer.get_vocab_size()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.failure is not None:
            raise self.failure
        return records_to_table([self._write_shard(batch.slice(row, 1)) for row in range(batch.num_rows)])

    def _write_shard(self, tokenized: pa.Table) -> ShardRecord:
        position, window_rows, windows = shard_from_arrow(tokenized)
        shard = self.shards[position]
        writer = AttemptWriter(self.output, shard.name)
        rows_read = error_rows = truncated_rows = token_count = 0
        # The next window's rows are read while this one runs (pyarrow releases the GIL).
        input_file = self.files[shard.file_index]
        tables = in_background(read_shard(input_file, shard, self.plan.window_rows), depth=1, name="bertbatch-read")
        try:
            for index, window in enumerate(windows):
                table = next(tables, None)
                if table is None or table.num_rows != window_rows[index]:
                    raise EngineError(
                        f"{input_file.path}: window {index} of {shard.name} read {table.num_rows if table else 0} rows, "
                        f"the tokenizer {window_rows[index]}; did the input change during the job? Run again to resume"
                    )
                last = index == len(window_rows) - 1
                prepared = batch_window(self.plan, shard, index, table, window.tokens, window.unreadable, last_of_shard=last)
                computed = compute_window(self.plan, self.model, prepared)
                writer.write(computed.table)
                error_rows += computed.error_rows
                truncated_rows += computed.truncated_rows
                token_count += computed.tokens
                rows_read += computed.rows_read
            return writer.seal(rows_read=rows_read, error_rows=error_rows, truncated_rows=truncated_rows, tokens=token_count)
        except BaseException:
            writer.abort()  # never leave a half-written attempt behind when the failure is ours
            raise
        finally:
            tables.close()
