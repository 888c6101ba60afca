"""Every check a job passes before it writes anything: the model directory, the options, the input columns.

``bertbatch run`` and ``bertbatch serve`` make them in ``run_job``; ``bertbatch submit`` makes them
too, so a queued job fails at submission rather than on a worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.config import RunConfig
from worker.decode import DECODERS, result_schema
from worker.embedding_format import EmbeddingFormat, plan_embedding_format
from worker.errors import InputError, InputSchemaError, UsageError
from worker.output_rows import added_columns
from worker.runner import ModelDir, open_model_dir
from worker.source import InputFile, inspect_inputs, resolve_inputs
from worker.text_plan import TextPlan, plan_text
from worker.tokenize import load_tokenizer


@dataclass(frozen=True)
class CheckedJob:
    """What the checks found: the model directory, the effective max length, the inspected input files.

    Also the job's text plan (prompt, chunking) and embedding format (``None`` for other tasks;
    int8/uint8 ranges are filled in by the job, see ``worker.calibration``).
    """

    model_dir: ModelDir
    max_length: int
    files: list[InputFile]
    text: TextPlan | None = None
    embedding: EmbeddingFormat | None = None


def check_job(config: RunConfig) -> CheckedJob:
    """Open the model directory, check the options against it and inspect the inputs; raise on the first problem."""
    model_dir = open_model_dir(config.model_dir)
    _refuse_model_inside_output(config)
    max_length = _check_options(config, model_dir)
    files = inspect_inputs(_input_paths(config), config.text_column, config.text_pair_column, config.id_column)
    _refuse_column_clashes(config, model_dir, files)
    tokenizer = load_tokenizer(model_dir.tokenizer_file, None)  # the prompt and template, never cut
    text = plan_text(config, model_dir.manifest, tokenizer, max_length)
    return CheckedJob(model_dir, max_length, files, text, plan_embedding_format(config, model_dir.manifest))


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
        if not DECODERS[manifest.task].takes_top_k:
            takers = " and ".join(task for task, decoder in DECODERS.items() if decoder.takes_top_k)
            raise UsageError(f"--top-k applies to {takers} models; {model_dir.path} is a {manifest.task} model")
        if not 1 <= config.top_k <= (manifest.top_k or 0):
            raise UsageError(f"--top-k must be between 1 and {manifest.top_k} (chosen at export), got {config.top_k}")
    plan_embedding_format(config, manifest)  # its usage errors before the inputs are read
    _check_head_options(config, model_dir)
    if config.engine == "ray":
        _check_ray_options(config)
    elif config.ray_address is not None or config.gpus_per_worker is not None:
        raise UsageError("--ray-address and --gpus-per-worker apply to --engine ray")
    return config.max_length or manifest.max_length


def _check_head_options(config: RunConfig, model_dir: ModelDir) -> None:
    """The options that shape classify and token-classify results apply to those models only."""
    manifest = model_dir.manifest
    if config.threshold is not None:
        if not manifest.multi_label:
            raise UsageError(
                f"--threshold applies to multi-label classify models; {model_dir.path} is a {manifest.task} model"
                + (f" with a {manifest.activation} activation" if manifest.task == "classify" else "")
            )
        if not 0.0 <= config.threshold <= 1.0:
            raise UsageError(f"--threshold must be between 0 and 1, got {config.threshold}")
    token_options = {"--aggregation": config.aggregation, "--ignore-labels": config.ignore_labels, "--stride": config.stride}
    given = [name for name, value in token_options.items() if value is not None]
    if manifest.task != "token-classify":
        if given:
            raise UsageError(f"{', '.join(given)} apply to token-classify models; {model_dir.path} is a {manifest.task} model")
        return
    if config.engine == "ray":
        # The Ray engine ships a shard's tokens to the workers in a fixed Arrow layout
        # (worker/shard_tokens.py) that does not carry character offsets yet.
        raise UsageError("token-classify runs on --engine local only for now: the Ray engine does not carry "
                         "the tokens' character offsets that entities need")
    if config.text_pair_column:
        # The pipeline classifies the tokens of one text, and entities are spans of that text.
        raise UsageError(
            f"--text-pair-column: {model_dir.path} is a token classifier, which labels the tokens of one text; "
            "token-classify takes --text-column only"
        )
    if config.stride is not None:
        if config.aggregation == "none":
            raise UsageError("--stride merges the entities of overlapping windows, which --aggregation none cannot do; "
                             "choose simple, first, average or max")
        longest = config.max_length or manifest.max_length
        if not 0 <= config.stride < longest - 2:
            raise UsageError(f"--stride must be between 0 and {longest - 3} (max length {longest} less [CLS] and [SEP]), "
                             f"got {config.stride}")


def _check_ray_options(config: RunConfig) -> None:
    """The ``--engine ray`` option checks that need no cluster (``worker.ray_engine`` checks the cluster's resources)."""
    if config.num_workers < 1:
        raise UsageError(f"--num-workers must be at least 1, got {config.num_workers}")
    gpus = config.gpus_per_worker
    if gpus is not None and gpus < 0:
        raise UsageError(f"--gpus-per-worker must be 0 or more, got {gpus:g}")
    if gpus and config.device == "cpu":
        raise UsageError(f"--gpus-per-worker {gpus:g} with --device cpu: drop one of them")
    if gpus == 0 and config.device == "cuda":
        raise UsageError("--device cuda with --gpus-per-worker 0: CPU-only workers cannot run CUDA")


def _input_paths(config: RunConfig) -> list[Path]:
    # Files inside the output directory are never inputs: a rerun must not read its own shards
    # back, and --overwrite must not delete what it is about to read.
    output = config.output.resolve()
    paths = [path for path in resolve_inputs(config.input) if not path.resolve().is_relative_to(output)]
    if not paths:
        raise InputError(f"{config.input}: every input file is inside the output directory {config.output}; choose another --output")
    return paths


def _refuse_model_inside_output(config: RunConfig) -> None:
    # The output directory is the job's to write and, with --overwrite, to clear: never the model's home.
    model, output = config.model_dir.resolve(), config.output.resolve()
    if model.is_relative_to(output):
        raise UsageError(
            f"--output {config.output} contains the model directory {config.model_dir}; "
            "--overwrite would delete it: choose an --output outside the model directory's parents"
        )


def _refuse_column_clashes(config: RunConfig, model_dir: ModelDir, files: list[InputFile]) -> None:
    # Passed-through columns are never silently replaced by result columns.
    results = {field.name for field in result_schema(model_dir.manifest)} | set(added_columns(config.chunking))
    for input_file in files:
        kept = set(input_file.columns) - (set() if config.keep_text else {config.text_column})
        clash = sorted(kept & results)
        if clash:
            raise InputSchemaError(
                f"{input_file.path}: column(s) {', '.join(clash)} would be overwritten by results; rename them first"
            )
