"""One window of rows (a record batch of a shard): tokenize, batch, run, and build its output table.

Both engines (local threads, Ray) call these functions, so a row gets the same
tokens, the same batches and the same numbers whichever engine runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from worker.batching import PaddedBatch, iter_padded_batches
from worker.config import RunConfig
from worker.decode import WindowResults
from worker.errors import InferenceBroken
from worker.modeldir.manifest import Manifest
from worker.runner import Runner
from worker.source import Shard, column_texts
from worker.tokenize import TokenizedWindow, tokenize_window


INFERENCE_FAILED = "inference failed: "
SYSTEMIC_FAILURE_ROWS = 8  # a window where at least this many rows, and none other, failed


@dataclass(frozen=True)
class ComputedWindow:
    """A window's output rows on their way to the writer, from either engine."""

    shard: Shard
    table: pa.Table
    error_rows: int
    truncated_rows: int
    tokens: int
    last_of_shard: bool


def tokenize_rows(config: RunConfig, tokenizer: object, table: pa.RecordBatch) -> tuple[TokenizedWindow, dict[int, str]]:
    """Tokenize a window's text (and pair) column; also returns row -> note for text that is not UTF-8."""
    unreadable: dict[int, str] = {}
    texts, invalid = column_texts(table.column(config.text_column))
    unreadable.update((row, f"invalid UTF-8 in column {config.text_column!r}") for row in invalid)
    pairs = None
    if config.text_pair_column:
        pairs, invalid = column_texts(table.column(config.text_pair_column))
        unreadable.update((row, f"invalid UTF-8 in column {config.text_pair_column!r}") for row in invalid)
    return tokenize_window(tokenizer, texts, pairs), unreadable  # type: ignore[arg-type]


def pad_window(config: RunConfig, tokens: TokenizedWindow, pad_id: int) -> list[PaddedBatch]:
    """Plan a window's batches (length-sorted, ``--batch-size`` and ``--max-tokens``) and pad them."""
    assert config.batch_size is not None and config.pad_multiple is not None, "filled in by the engine (with_batch_limits)"
    return list(iter_padded_batches(
        tokens.token_ids, tokens.type_ids, pad_id, config.batch_size, config.max_tokens, multiple_of=config.pad_multiple
    ))


def run_window(
    config: RunConfig,
    runner: Runner,
    manifest: Manifest,
    vocabulary: Sequence[str],
    tokens: TokenizedWindow,
    batches: list[PaddedBatch],
    unreadable: dict[int, str],
) -> tuple[WindowResults, list[str | None]]:
    """Run every batch of a window; a failing batch is split until the bad row is isolated.

    Returns the results and each row's error note (``None`` for a row with a result).
    A row whose inference fails is flagged null in ``tokens``.
    """
    results = WindowResults(manifest, len(tokens.token_ids), config.top_k, vocabulary)
    errors: list[str | None] = [_null_note(config) if null else None for null in tokens.null]
    for row, note in unreadable.items():  # read as null, but say why
        errors[row] = note
    for batch in batches:
        _run_splitting(runner, batch, tokens, results, errors)
    _refuse_systemic_failure(errors, unreadable, len(tokens.token_ids) - int(tokens.null.sum()))
    return results, errors


def _refuse_systemic_failure(errors: list[str | None], unreadable: dict[int, str], succeeded: int) -> None:
    # One bad row is an error row; a model that fails on every row of a window is broken
    # (a lost device, a bad install) and must stop the job, not turn a dataset into error rows.
    failed = [note for row, note in enumerate(errors) if note and note.startswith(INFERENCE_FAILED) and row not in unreadable]
    if len(failed) >= SYSTEMIC_FAILURE_ROWS and succeeded == 0:
        raise InferenceBroken(
            f"the model failed on all {len(failed)} rows of a window ({failed[-1]}); finished shards are kept, "
            "fix the device or model and run again to resume"
        )


def finish_window(
    config: RunConfig,
    shard: Shard,
    table: pa.RecordBatch,
    tokens: TokenizedWindow,
    results: WindowResults,
    errors: list[str | None],
    last_of_shard: bool,
) -> ComputedWindow:
    """The window's output rows (its input columns, less the text unless ``--keep-text``, then the results) and counts."""
    if not config.keep_text:
        table = table.drop_columns([config.text_column])
    for name, values in results.columns(tokens.null, tokens.token_ids, errors).items():
        table = table.append_column(name, values)
    return ComputedWindow(
        shard=shard,
        table=pa.Table.from_batches([table]),
        error_rows=sum(error is not None for error in errors),
        truncated_rows=int(tokens.truncated.sum()),
        tokens=int(np.sum(tokens.lengths)),
        last_of_shard=last_of_shard,
    )


def _run_splitting(
    runner: Runner, batch: PaddedBatch, tokens: TokenizedWindow, results: WindowResults, errors: list[str | None]
) -> None:
    try:
        outputs = runner.run(batch)
    except Exception as error:  # onnxruntime raises its own types for OOM and kernel failures
        if len(batch.rows) == 1:
            errors[int(batch.rows[0])] = f"{INFERENCE_FAILED}{type(error).__name__}: {error}"
            tokens.null[batch.rows[0]] = True
            return
        half = len(batch.rows) // 2
        for part in (slice(0, half), slice(half, None)):
            _run_splitting(runner, _sub_batch(batch, part), tokens, results, errors)
        return
    results.add(batch, outputs)


def _sub_batch(batch: PaddedBatch, part: slice) -> PaddedBatch:
    mask = batch.attention_mask[part]
    width = max(1, int(mask.sum(axis=1).max()))
    return PaddedBatch(batch.rows[part], batch.input_ids[part, :width], mask[:, :width], batch.token_type_ids[part, :width])


def _null_note(config: RunConfig) -> str:
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    return f"null text in column {' or '.join(repr(c) for c in columns)}"
