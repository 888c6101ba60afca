"""The Ray engine (``--engine ray``): windows computed on a Ray cluster, written by this process.

This process (the driver) plans the shards, holds the output lock, writes each shard and records
it in the job file exactly as with the local engine, so both share the output layout and the
resume rules. Ray only computes, in a Ray Data pipeline with one row per window::

    pending shards -> read + tokenize (CPU tasks, one per shard)
                   -> inference (an actor pool; each actor loads one onnxruntime session once)
                   -> this process, in order (``preserve_order``)

A row carries a whole window as one pickled cell, so however Ray Data merges or splits blocks,
an actor sees the windows the local engine would cut and runs them through the same code
(``worker.window``): same batches, same numbers. Ray Data restarts actors that die and retries
their windows; the driver checks every window arrives once and in order before it is written.
If the driver dies, committed shards stay and a rerun resumes like a local one.

``ray`` is imported inside functions only, so ``bertbatch --help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from worker.config import Device, RunConfig, with_batch_limits
from worker.decode import vocabulary_of
from worker.errors import DeviceUnavailable, EngineError, UsageError, WorkerError
from worker.modeldir.session import CPU, CUDA
from worker.runner import ModelDir, Runner, open_model_dir
from worker.source import InputFile, Shard, read_shard
from worker.tokenize import TokenizedWindow, load_tokenizer
from worker.window import ComputedWindow, finish_window, pad_window, run_window, tokenize_rows

WINDOW_COLUMN = "window"  # the one column of the pipeline's rows: a pickled window
# An actor that dies is restarted (a lost node, an OOM kill) and the windows it held are retried,
# but a window that has killed its actor this many times fails the job rather than loop forever.
# (Read tasks keep Ray Data's default: retried whenever their worker dies.)
WINDOW_RETRIES = 3


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


@dataclass(frozen=True)
class _TokenizedWindow:
    """A read and tokenized window on its way to an inference actor."""

    shard: Shard
    window: int  # the window's index in its shard
    table: pa.RecordBatch
    tokens: TokenizedWindow
    unreadable: dict[int, str]
    last_of_shard: bool


def check_ray_options(config: RunConfig) -> None:
    """The ``--engine ray`` option checks that need no cluster (``bertbatch submit`` makes them too)."""
    if config.num_workers < 1:
        raise UsageError(f"--num-workers must be at least 1, got {config.num_workers}")
    gpus = config.gpus_per_worker
    if gpus is not None and gpus < 0:
        raise UsageError(f"--gpus-per-worker must be 0 or more, got {gpus:g}")
    if gpus and config.device == "cpu":
        raise UsageError(f"--gpus-per-worker {gpus:g} with --device cpu: drop one of them")
    if gpus == 0 and config.device == "cuda":
        raise UsageError("--device cuda with --gpus-per-worker 0: CPU-only workers cannot run CUDA")


@contextmanager
def compute_on_ray(
    config: RunConfig, model_dir: ModelDir, max_length: int, files: list[InputFile], shards: list[Shard]
) -> Iterator[tuple[str, Iterator[ComputedWindow]]]:
    """The Ray engine: yields ``(provider, computed windows of shards, in order)``.

    Joins ``config.ray_address``, or the Ray runtime this process already runs, or starts a
    local one (shut down on leaving).
    """
    with _ray_runtime(config):
        plan = plan_workers(config)
        config = with_batch_limits(config, on_gpu=plan.gpus > 0)
        dataset = _build_dataset(config, model_dir, max_length, files, shards, plan)
        provider = f"{plan.provider} on {config.num_workers} Ray workers"
        windows = _in_order(dataset, shards)
        try:
            yield provider, windows
        finally:
            windows.close()  # stops the Ray Data execution when leaving early


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
    try:
        if address is None:
            # Logical CPUs for the workers and one reading stage even on a machine with fewer cores:
            # they share the cores, where a cluster of real CPUs would leave the job waiting forever.
            cpus = max(os.cpu_count() or 1, config.num_workers * (config.threads or 1) + 1)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    except ConnectionError as error:
        raise EngineError(f"--ray-address {address}: cannot connect to a Ray cluster: {error}") from error
    try:
        yield
    finally:
        ray.shutdown()


def _build_dataset(
    config: RunConfig, model_dir: ModelDir, max_length: int, files: list[InputFile], shards: list[Shard], plan: WorkerPlan
) -> Any:
    import ray

    # Workers on other nodes have another working directory: give them absolute paths.
    files = [replace(input_file, path=input_file.path.absolute()) for input_file in files]
    model_path = model_dir.path.absolute()
    read = functools.partial(
        _read_and_tokenize, config=config, files=files, shards=shards, tokenizer_file=model_dir.tokenizer_file.absolute(), max_length=max_length
    )
    tokenized = (
        ray.data.range(len(shards), override_num_blocks=max(1, len(shards)))
        .map_batches(read, batch_size=None, batch_format="pyarrow", num_cpus=1)
        # A block per window, so windows (not whole shards) are shared out to actors and retried.
        .repartition(target_num_rows_per_block=1)
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these keyword arguments and names no replacement yet; pyproject caps Ray below 2.64.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = tokenized.map_batches(
            _InferenceActor,
            fn_constructor_args=(config, model_path, max_length, plan),
            batch_size=1,  # one row, one window
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.num_workers),
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            max_restarts=-1,
            max_task_retries=WINDOW_RETRIES,
        )
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # the CLI draws its own
    # A UDF's own error (e.g. a model directory that a node cannot see) rather than a wrapper.
    dataset.context.raise_original_map_exception = True
    return dataset


def _in_order(dataset: Any, shards: list[Shard]) -> Generator[ComputedWindow, None, None]:
    """The dataset's windows, checked to come once each, in shard and window order."""
    import ray

    position, window = 0, 0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for cell in batch.column(WINDOW_COLUMN).to_pylist():
                got_window, computed = pickle.loads(cell)
                if position == len(shards) or (computed.shard, got_window) != (shards[position], window):
                    raise EngineError(
                        f"Ray returned window {got_window} of {computed.shard.name} out of order (expected window {window} "
                        f"of shard {position + 1} of {len(shards)}); the current shard is dropped, run again to resume"
                    )
                window += 1
                if computed.last_of_shard:
                    position, window = position + 1, 0
                yield computed
    except ray.exceptions.RayError as error:
        raise _worker_error_in(error) or EngineError(
            f"the Ray engine failed: {type(error).__name__}: {error}; finished shards are kept, run again to resume"
        ) from error
    if position != len(shards):
        raise EngineError(f"Ray returned {position} of {len(shards)} shards; run again to resume")


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
def _tokenizer(path: Path, max_length: int) -> Any:
    # Ray reuses worker processes: load a tokenizer once per process, not once per shard.
    return load_tokenizer(path, max_length)


def _read_and_tokenize(
    batch: pa.Table, *, config: RunConfig, files: list[InputFile], shards: list[Shard], tokenizer_file: Path, max_length: int
) -> Iterator[pa.Table]:
    """Stage 1 (a Ray task per shard): read a shard's windows and tokenize them."""
    tokenizer = _tokenizer(tokenizer_file, max_length)
    for position in batch.column("id").to_pylist():
        shard = shards[position]
        tables = list(read_shard(files[shard.file_index], shard, config.read_batch_rows))
        for window, table in enumerate(tables):
            tokens, unreadable = tokenize_rows(config, tokenizer, table)
            ready = _TokenizedWindow(shard, window, table, tokens, unreadable, window == len(tables) - 1)
            yield _cells([ready])


class _InferenceActor:
    """Stage 2 (a Ray actor): one onnxruntime session, loaded once, runs window after window."""

    def __init__(self, config: RunConfig, model_path: Path, max_length: int, plan: WorkerPlan) -> None:
        self.config = config
        # Ray hands a task's exception back to the driver as itself, but (in some versions) a
        # constructor's only as text: a worker that cannot load its model fails its first window.
        self.failure: WorkerError | None = None
        try:
            self.model_dir = open_model_dir(model_path)  # on this node: the model must be on shared storage
            self.runner = Runner(self.model_dir, plan.device, plan.threads)
            tokenizer = load_tokenizer(self.model_dir.tokenizer_file, max_length)
        except WorkerError as error:
            self.failure = error
            return
        self.vocabulary = vocabulary_of(tokenizer, tokenizer.get_vocab_size())
        self.pad_id = self.model_dir.manifest.special_tokens.pad

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.failure is not None:
            raise self.failure
        computed = []
        for cell in batch.column(WINDOW_COLUMN).to_pylist():
            ready: _TokenizedWindow = pickle.loads(cell)
            batches = pad_window(self.config, ready.tokens, self.pad_id)
            results, errors = run_window(
                self.config, self.runner, self.model_dir.manifest, self.vocabulary, ready.tokens, batches, ready.unreadable
            )
            finished = finish_window(self.config, ready.shard, ready.table, ready.tokens, results, errors, ready.last_of_shard)
            computed.append((ready.window, finished))
        return _cells(computed)


def _cells(items: Sequence[object]) -> pa.Table:
    return pa.table({WINDOW_COLUMN: pa.array([pickle.dumps(item, protocol=5) for item in items], pa.large_binary())})
