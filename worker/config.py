"""The one frozen config object a job is built from (the CLI only fills it in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Device = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bertbatch run`` decides.

    Options that change results (model, columns, max_length, top_k, shard size)
    are part of the job's identity; the others (batching, device, threads) only
    change speed, so a job may resume with different values of them.
    """

    model_dir: Path
    input: str
    output: Path
    text_column: str
    text_pair_column: str | None = None
    id_column: str | None = None
    batch_size: int = 64
    max_tokens: int | None = 16384
    max_length: int | None = None
    device: Device = "auto"
    top_k: int | None = None
    threads: int | None = None
    rows_per_shard: int = 100_000
    read_batch_rows: int = 4096
    max_errors: int | None = None
    keep_text: bool = False
    overwrite: bool = False
    progress: bool = False
