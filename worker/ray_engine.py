"""The Ray engine (``--engine ray``): windows computed on a Ray cluster, written by this process.

This process (the driver) plans the shards, holds the output lock, writes each shard and records
it in the job file exactly as with the local engine, so both share the output layout and the
resume rules. Ray only computes, in a Ray Data pipeline with one row per window::

    pending shards -> prepare_shard: read, tokenize, pad (CPU tasks, one per shard)
                   -> compute_window: run, decode, finish (an actor pool; each actor loads one
                      onnxruntime session once)
                   -> this process, in order (``preserve_order``)

A row carries a whole window as one pickled cell, so however Ray Data merges or splits blocks,
an actor sees the windows the local engine would cut and runs them through the same code and the
same ``WindowPlan`` (``worker.window``): same batches, same numbers. Ray Data restarts actors that die and retries
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from worker.checks import CheckedJob
from worker.config import Device, RunConfig
from worker.decode import vocabulary_of
from worker.errors import DeviceUnavailable, EngineError, UsageError, WorkerError
from worker.modeldir.session import CPU, CUDA
from worker.process_guard import watch_new_processes
from worker.runner import Runner, open_model_dir
from worker.source import InputFile, Shard
from worker.tokenize import load_tokenizer
from worker.window import ComputedWindow, LoadedModel, PreparedWindow, WindowPlan, compute_window, plan_windows, prepare_shard

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


@contextmanager
def compute_on_ray(config: RunConfig, job: CheckedJob, shards: list[Shard]) -> Iterator[tuple[str, Iterator[ComputedWindow]]]:
    """The Ray engine: yields ``(provider, computed windows of shards, in order)``.

    Joins ``config.ray_address``, or the Ray runtime this process already runs, or starts a
    local one (shut down on leaving).
    """
    with _ray_runtime(config):
        workers = plan_workers(config)
        plan = plan_windows(config, job.model_dir.manifest, job.max_length, workers.gpus > 0, job.text, job.embedding)
        dataset = _build_dataset(config, plan, job, shards, workers)
        provider = f"{workers.provider} on {config.num_workers} Ray workers"
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
    model_path = job.model_dir.path.absolute()
    read = functools.partial(
        _prepare_shards, plan=plan, files=files, shards=shards, tokenizer_file=job.model_dir.tokenizer_file.absolute()
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
            fn_constructor_args=(plan, model_path, workers),
            batch_size=1,  # one row, one window
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.num_workers),
            num_cpus=workers.cpus,
            num_gpus=workers.gpus,
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
                computed: ComputedWindow = pickle.loads(cell)
                if position == len(shards) or (computed.shard, computed.index) != (shards[position], window):
                    raise EngineError(
                        f"Ray returned window {computed.index} of {computed.shard.name} out of order (expected window {window} "
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
def _tokenizer(path: Path, max_length: int | None) -> Any:
    # Ray reuses worker processes: load a tokenizer once per process, not once per shard.
    return load_tokenizer(path, max_length)


def _prepare_shards(batch: pa.Table, *, plan: WindowPlan, files: list[InputFile], shards: list[Shard], tokenizer_file: Path) -> Iterator[pa.Table]:
    """Stage 1 (a Ray task per shard): read a shard's windows, tokenize and pad them."""
    tokenizer = _tokenizer(tokenizer_file, plan.tokenizer_max_length)
    for position in batch.column("id").to_pylist():
        shard = shards[position]
        for window in prepare_shard(plan, tokenizer, files[shard.file_index], shard):
            yield _cells([window])


class _InferenceActor:
    """Stage 2 (a Ray actor): one onnxruntime session, loaded once, runs window after window."""

    def __init__(self, plan: WindowPlan, model_path: Path, workers: WorkerPlan) -> None:
        self.plan = plan
        # Ray hands a task's exception back to the driver as itself, but (in some versions) a
        # constructor's only as text: a worker that cannot load its model fails its first window.
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
        windows: list[PreparedWindow] = [pickle.loads(cell) for cell in batch.column(WINDOW_COLUMN).to_pylist()]
        return _cells([compute_window(self.plan, self.model, window) for window in windows])


def _cells(items: Sequence[object]) -> pa.Table:
    return pa.table({WINDOW_COLUMN: pa.array([pickle.dumps(item, protocol=5) for item in items], pa.large_binary())})
