"""The one frozen config object a job is built from (the CLI only fills it in)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional, get_type_hints

Device = Literal["auto", "cuda", "cpu"]
Engine = Literal["local", "ray"]
# off: truncate at max_length; mean: one embedding per row from its chunks; rows: one output row per chunk.
Chunking = Literal["off", "mean", "rows"]
# How embeddings are stored (worker/quantization.py).
EmbeddingDtype = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
# token-classify: transformers' TokenClassificationPipeline aggregation strategies (worker/entities.py).
Aggregation = Literal["none", "simple", "first", "average", "max"]


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bertbatch run`` decides.

    Options that change results (model, columns, max_length, top_k, shard size)
    are part of the job's identity; the others (batching, device, threads, the
    engine and its workers) only change speed, so a job may resume with different
    values of them.

    ``engine="ray"`` computes on a Ray cluster: ``num_workers`` actors, each with
    ``gpus_per_worker`` GPUs (``None``: one GPU when the cluster has GPUs and
    ``device`` is not ``cpu``, else CPU actors), joining ``ray_address`` or
    starting a local Ray runtime when it is ``None``.

    Long texts and embedding outputs (embed models; all part of the job's identity):
    ``chunking`` cuts texts into model-sized chunks instead of truncating them,
    ``chunk_overlap`` tokens shared by consecutive chunks; ``prompt`` (or the manifest's
    ``prompt_name``) is prepended to every text; ``dimensions`` keeps the first N
    (Matryoshka); ``embedding_dtype`` stores embeddings in a lower precision, int8/uint8
    with ranges from the first ``calibration_rows`` rows or the ``calibration`` Parquet.
    """

    model_dir: Path
    input: str
    output: Path
    text_column: str
    text_pair_column: str | None = None
    id_column: str | None = None
    batch_size: int | None = None  # None: chosen by device, see BATCH_LIMITS and worker.window.plan_windows
    max_tokens: int | None = None
    pad_multiple: int | None = None  # None: chosen by device, see PAD_MULTIPLE
    max_length: int | None = None
    device: Device = "auto"
    top_k: int | None = None
    threads: int | None = None
    rows_per_shard: int = 100_000
    read_batch_rows: int = 4096
    max_errors: int | None = None
    keep_text: bool = False
    verify_inputs: bool = False  # identify every input file by its content too (always done below 64 MiB)
    overwrite: bool = False
    engine: Engine = "local"
    num_workers: int = 2
    gpus_per_worker: float | None = None
    ray_address: str | None = None
    chunking: Chunking = "off"
    chunk_overlap: int = 32
    prompt: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    embedding_dtype: EmbeddingDtype = "float32"
    calibration_rows: int = 1000
    calibration: Path | None = None

    threshold: float | None = None  # multi-label classify: the probability a label needs (None: 0.5)
    aggregation: Aggregation | None = None  # token-classify: as the pipeline's aggregation_strategy (None: simple)
    ignore_labels: tuple[str, ...] | None = None  # token-classify: labels dropped from entities (None: O)
    stride: int | None = None  # token-classify: split rows longer than max_length, overlapping by this


# Fields older versions wrote into queued specs, which no longer mean anything: ignored on reading.
RETIRED_FIELDS = frozenset({"progress"})


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with ``~`` expanded and paths made absolute, once, so every check and every use sees the same path.

    ``..`` and symlinks are kept as written: they are resolved where a path is checked
    (``worker.confinement``), the way every later use resolves them. A worker started in
    another directory finds the same files.
    """
    return replace(
        config,
        model_dir=config.model_dir.expanduser().absolute(),
        input=str(Path(config.input).expanduser().absolute()),
        output=config.output.expanduser().absolute(),
        calibration=None if config.calibration is None else config.calibration.expanduser().absolute(),
    )


def config_to_spec(config: RunConfig) -> dict[str, Any]:
    """The JSON form of a config (a queued job's spec), paths as strings."""
    return {item.name: _json_value(getattr(config, item.name)) for item in fields(RunConfig)}


def config_from_spec(spec: dict[str, Any]) -> RunConfig:
    """Rebuild a config from ``config_to_spec``'s form; unknown or missing fields raise ``ValueError``."""
    hints = get_type_hints(RunConfig)
    spec = {name: value for name, value in spec.items() if name not in RETIRED_FIELDS}
    unknown = sorted(set(spec) - set(hints))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (a spec from a newer bertbatch?)")
    try:
        values: dict[str, Any] = {
            name: Path(value) if hints[name] in _PATH_TYPES and value is not None else tuple(value) if isinstance(value, list) else value for name, value in spec.items()
        }
        return RunConfig(**values)
    except TypeError as error:  # a required field is missing
        raise ValueError(str(error)) from error


_PATH_TYPES = (Path, Optional[Path])


def _json_value(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


# (rows, padded tokens) per model call when --batch-size / --max-tokens are not given.
# A CPU is fastest on small batches that stay in cache (MiniLM on 2 cores: 80 rows/s at
# 2,048 tokens against 67 at 16,384); a GPU needs large ones to fill it.
BATCH_LIMITS: dict[str, tuple[int, int]] = {"cpu": (64, 2048), "cuda": (1024, 32768)}


# Batch widths are rounded up to a multiple of this. GPU kernels (tensor cores) run fastest on
# multiples of 8, and fewer distinct widths bound the CUDA arena; a CPU only pays for the extra
# padding (MiniLM on 2 cores: about 2% more rows/s with exact widths).
PAD_MULTIPLE: dict[str, int] = {"cpu": 1, "cuda": 8}
