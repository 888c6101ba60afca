"""A job: input shards -> tokenize -> batch -> run -> decode -> output shards, resumable.

Three stages overlap in threads: reading and tokenizing, running the model, and
decoding and writing. Each shard is committed atomically and recorded in the
job file, so a rerun of the same command skips what is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from worker.atomic import write_text_atomic
from worker.batching import PaddedBatch
from worker.config import Device, RunConfig, with_batch_limits
from worker.decode import WindowResults, result_schema, vocabulary_of
from worker.errors import InputError, InputSchemaError, OutputError, TooManyErrors, UsageError
from worker.jobstate import JobState, OutputLock, begin, job_identity, open_job
from worker.modeldir.session import CUDA
from worker.pipeline import in_background
from worker.runner import ModelDir, Runner, check_device, open_model_dir
from worker.sink import ShardWriter
from worker.source import InputFile, Shard, inspect_inputs, plan_shards, read_shard, resolve_inputs
from worker.tokenize import TokenizedWindow, load_tokenizer
from worker.window import ComputedWindow, finish_window, pad_window, run_window, tokenize_rows

Engine = AbstractContextManager[tuple[str, Iterator[ComputedWindow]]]  # (provider, computed windows in shard order)

Progress = Callable[[int], None]
RunnerFactory = Callable[[ModelDir, Device, int | None], Runner]


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
class _Window:
    """One record batch of a shard on its way through the stages."""

    shard: Shard
    table: pa.RecordBatch
    tokens: TokenizedWindow
    batches: list[PaddedBatch]
    unreadable: dict[int, str] = field(default_factory=dict)  # row -> error note, for text that is not UTF-8
    results: WindowResults | None = None
    errors: list[str | None] = field(default_factory=list)
    last_of_shard: bool = False


@dataclass
class _Counters:
    rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    tokens: int = 0


def check_job(config: RunConfig) -> tuple[ModelDir, int, list[InputFile]]:
    """Every check ``run_job`` makes before it writes anything (model directory, options, input columns).

    ``bertbatch submit`` runs it too, so a queued job fails at submission rather than on a worker.
    Returns the model directory, the effective max length and the inspected input files.
    """
    model_dir = open_model_dir(config.model_dir)
    max_length = _check_options(config, model_dir)
    files = inspect_inputs(_input_paths(config), config.text_column, config.text_pair_column, config.id_column)
    _refuse_column_clashes(config, model_dir, files)
    return model_dir, max_length, files


def run_job(
    config: RunConfig,
    progress: Progress | None = None,
    on_start: Callable[[str, int], None] | None = None,
    make_runner: RunnerFactory = Runner,
) -> JobSummary:
    """Run (or resume) a job. ``on_start(provider, rows_to_do)`` is called once the session is ready.

    ``config.engine`` picks who computes the windows: threads in this process, or a Ray cluster
    (``worker.ray_engine``); either way this process writes and records the shards, so both
    engines share the output layout and the resume rules. ``make_runner`` builds the local
    engine's onnxruntime session, only when there is work to do; ``bertbatch serve`` passes a
    cache so sessions stay warm across jobs.
    """
    started = time.perf_counter()
    model_dir, max_length, files = check_job(config)
    if config.engine == "local" and (config.device == "cuda" or model_dir.manifest.cuda_only):
        # Also when there is nothing left to do: a script asking for CUDA on a machine without it learns now.
        # (Not for Ray: the cluster's nodes hold the devices, not this driver.)
        check_device(model_dir, config.device)
    shards = plan_shards(files, config.rows_per_shard)
    try:
        config.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{config.output}: cannot create the output directory: {error}") from error
    with OutputLock(config.output):
        state = open_job(config.output, job_identity(config, model_dir, files), config.overwrite)
        pending = [shard for shard in shards if shard.name not in state.completed]
        if state.success_file.is_file() and not pending and not state.clear_first:
            return JobSummary(config.output, 0, 0, 0, 0, time.perf_counter() - started, "none", 0, len(shards), True)
        engine: Engine
        if config.engine == "ray":
            from worker.ray_engine import compute_on_ray

            engine = compute_on_ray(config, model_dir, max_length, files, pending)
        else:
            engine = _compute_locally(config, model_dir, max_length, files, pending, make_runner)
        with engine as (provider, computed):
            begin(state)  # only now that the engine is up: a run that cannot start changes nothing
            if on_start:
                on_start(provider, sum(shard.num_rows for shard in pending))
            counters = _write_shards(config, state, computed, progress)
        _write_success(state, counters, provider)
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


def _check_options(config: RunConfig, model_dir: ModelDir) -> int:
    manifest = model_dir.manifest
    if config.batch_size is not None and config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.max_tokens is not None and config.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {config.max_tokens}")
    if config.rows_per_shard < 1:
        raise UsageError(f"--rows-per-shard must be at least 1, got {config.rows_per_shard}")
    if config.max_errors is not None and config.max_errors < 0:
        raise UsageError(f"--max-errors must be 0 or more, got {config.max_errors}")
    if config.max_length is not None and not 2 <= config.max_length <= manifest.max_length:
        raise UsageError(f"--max-length must be between 2 and the model's {manifest.max_length}, got {config.max_length}")
    if config.top_k is not None:
        if manifest.task != "fill-mask":
            raise UsageError(f"--top-k applies to fill-mask models; {model_dir.path} is a {manifest.task} model")
        if not 1 <= config.top_k <= (manifest.top_k or 0):
            raise UsageError(f"--top-k must be between 1 and {manifest.top_k} (chosen at export), got {config.top_k}")
    if config.engine == "ray":
        from worker.ray_engine import check_ray_options

        check_ray_options(config)
    elif config.ray_address is not None or config.gpus_per_worker is not None:
        raise UsageError("--ray-address and --gpus-per-worker apply to --engine ray")
    return config.max_length or manifest.max_length


def _input_paths(config: RunConfig) -> list[Path]:
    # Files inside the output directory are never inputs: a rerun must not read its own shards
    # back, and --overwrite must not delete what it is about to read.
    output = config.output.resolve()
    paths = [path for path in resolve_inputs(config.input) if not path.resolve().is_relative_to(output)]
    if not paths:
        raise InputError(f"{config.input}: every input file is inside the output directory {config.output}; choose another --output")
    return paths


def _refuse_column_clashes(config: RunConfig, model_dir: ModelDir, files: list[InputFile]) -> None:
    # Passed-through columns are never silently replaced by result columns.
    results = {field.name for field in result_schema(model_dir.manifest)}
    for input_file in files:
        kept = set(input_file.columns) - (set() if config.keep_text else {config.text_column})
        clash = sorted(kept & results)
        if clash:
            raise InputSchemaError(
                f"{input_file.path}: column(s) {', '.join(clash)} would be overwritten by results; rename them first"
            )


@contextmanager
def _compute_locally(
    config: RunConfig,
    model_dir: ModelDir,
    max_length: int,
    files: list[InputFile],
    shards: list[Shard],
    make_runner: RunnerFactory,
) -> Iterator[tuple[str, Iterator[ComputedWindow]]]:
    """The local engine: reading and tokenizing, and running the model, in two threads of this process."""
    runner = make_runner(model_dir, config.device, config.threads)
    config = with_batch_limits(config, on_gpu=runner.provider == CUDA)
    tokenizer = load_tokenizer(model_dir.tokenizer_file, max_length)
    vocabulary = vocabulary_of(tokenizer, tokenizer.get_vocab_size())
    # The read stage is owned by the run stage only, so closing ``computed`` stops both threads.
    prepared = in_background(_prepare(config, files, shards, tokenizer, model_dir), name="bertbatch-read")
    computed = in_background(_compute(prepared, runner, config, vocabulary, model_dir), name="bertbatch-run")
    del prepared
    try:
        # Output tables are built by the consumer (the writing thread), the third stage.
        yield runner.provider, (_finish(config, window) for window in computed)
    finally:
        computed.close()  # stop and join the stage threads, also when leaving on an error or an interrupt


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
                progress(window.table.num_rows)
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


def _prepare(
    config: RunConfig, files: list[InputFile], shards: list[Shard], tokenizer: object, model_dir: ModelDir
) -> Iterator[_Window]:
    """Stage 1: read a shard's record batches, tokenize them, plan and pad batches."""
    pad_id = model_dir.manifest.special_tokens.pad
    for shard in shards:
        batches = list(read_shard(files[shard.file_index], shard, config.read_batch_rows))
        for position, table in enumerate(batches):
            tokens, unreadable = tokenize_rows(config, tokenizer, table)
            padded = pad_window(config, tokens, pad_id)
            yield _Window(shard, table, tokens, padded, unreadable, last_of_shard=position == len(batches) - 1)


def _compute(windows: Generator[_Window, None, None], runner: Runner, config: RunConfig, vocabulary: list[str], model_dir: ModelDir) -> Iterator[_Window]:
    """Stage 2: run every batch of a window."""
    try:
        for window in windows:
            window.results, window.errors = run_window(
                config, runner, model_dir.manifest, vocabulary, window.tokens, window.batches, window.unreadable
            )
            yield window
    finally:
        windows.close()  # also when this stage fails: stop and join the read stage's thread


def _finish(config: RunConfig, window: _Window) -> ComputedWindow:
    """Stage 3 (the writer's thread): a run window's output table and counts."""
    assert window.results is not None
    return finish_window(config, window.shard, window.table, window.tokens, window.results, window.errors, window.last_of_shard)


def _count(counters: _Counters, window: ComputedWindow) -> None:
    counters.rows += window.table.num_rows
    counters.error_rows += window.error_rows
    counters.truncated_rows += window.truncated_rows
    counters.tokens += window.tokens


def _write_success(state: JobState, counters: _Counters, provider: str) -> None:
    path = state.success_file
    record = {"rows_this_run": counters.rows, "error_rows_this_run": counters.error_rows, "provider": provider}
    try:
        write_text_atomic(path, json.dumps(record) + "\n")  # a reader sees a whole _SUCCESS or none
    except OSError as error:
        raise OutputError(f"{path}: cannot write it: {error}") from error
