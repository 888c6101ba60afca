"""The window pipeline: one window of rows (a record batch of a shard) from input rows to output rows.

    prepare_window (tokenize + plan and pad batches) -> run_window (model + decode) -> finish_window (output table)

Both engines call these functions on these types, with one ``WindowPlan`` resolved per job, so a row
gets the same tokens, the same batches and the same numbers whichever engine runs it; they differ only
in where the stages run (``worker.local_engine``: three threads of this process; ``worker.ray_engine``:
read tasks and inference actors, ``compute_window`` being run and finish together).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from worker.batching import PaddedBatch, iter_padded_batches, with_pooling_skip
from worker.config import BATCH_LIMITS, PAD_MULTIPLE, Chunking, RunConfig
from worker.decode import DecodeOptions, WindowResults, decode_options
from worker.embedding_format import EmbeddingFormat
from worker.errors import InferenceBroken
from worker.modeldir.manifest import Manifest
from worker.output_rows import assemble_table
from worker.runner import Runner
from worker.source import InputFile, Shard, column_texts, read_shard
from worker.text_plan import TextPlan, tokenize_units
from worker.tokenize import TokenizedRows, tokenize_window

INFERENCE_FAILED = "inference failed: "
SYSTEMIC_FAILURE_ROWS = 8  # a window where at least this many rows, and none other, failed


@dataclass(frozen=True)
class WindowPlan:
    """How every window of a job is read, tokenized, batched and turned into output rows.

    Resolved once per job by ``plan_windows``, once the engine knows its device (the batch limits
    and the padding multiple the user left open depend on it).
    """

    text_column: str
    text_pair_column: str | None
    keep_text: bool
    window_rows: int  # rows read per window (``RunConfig.read_batch_rows``)
    max_length: int  # the tokenizer truncates here
    batch_size: int
    max_tokens: int
    pad_multiple: int
    pad_id: int
    top_k: int | None
    # Long texts and embedding outputs (#12): the prompt, truncation or chunking; the embedding
    # column's dimensions and precision, int8/uint8 ranges included (decided once per job).
    text: TextPlan | None = None
    embedding: EmbeddingFormat | None = None
    # classify and token-classify (#11): the threshold, aggregation and ignored labels; token-classify
    # tokenizes with character offsets, and with a stride splits long rows into overlapping windows.
    decode: DecodeOptions = DecodeOptions()
    with_offsets: bool = False
    stride: int | None = None

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])

    @property
    def chunking(self) -> Chunking:
        return self.text.chunking if self.text is not None else "off"

    @property
    def tokenizer_max_length(self) -> int | None:
        """Where the tokenizer truncates: ``max_length``, or nowhere when chunking (chunks cut texts)."""
        return None if self.chunking != "off" else self.max_length


def plan_windows(
    config: RunConfig,
    manifest: Manifest,
    max_length: int,
    on_gpu: bool,
    text: TextPlan | None = None,
    embedding: EmbeddingFormat | None = None,
) -> WindowPlan:
    """The job's window plan; batch limits and the padding multiple not given default by device.

    ``text`` and ``embedding`` come from the job's checks (``worker.checks``), with the
    int8/uint8 ranges filled in by the job (``worker.calibration``).
    """
    device = "cuda" if on_gpu else "cpu"
    rows, tokens = BATCH_LIMITS[device]
    return WindowPlan(
        text_column=config.text_column,
        text_pair_column=config.text_pair_column,
        keep_text=config.keep_text,
        window_rows=config.read_batch_rows,
        max_length=max_length,
        batch_size=config.batch_size if config.batch_size is not None else rows,
        max_tokens=config.max_tokens if config.max_tokens is not None else tokens,
        pad_multiple=config.pad_multiple if config.pad_multiple is not None else PAD_MULTIPLE[device],
        pad_id=manifest.special_tokens.pad,
        top_k=config.top_k,
        text=text,
        embedding=embedding,
        decode=decode_options(config),
        with_offsets=manifest.task == "token-classify",
        stride=config.stride,
    )


@dataclass(frozen=True)
class PreparedWindow:
    """A window read, tokenized and cut into padded batches: what the model runs on."""

    shard: Shard
    index: int  # the window's position in its shard
    table: pa.RecordBatch  # the input rows
    tokens: TokenizedRows  # one unit per row, or per chunk of a row (``tokens.chunks``)
    batches: list[PaddedBatch]
    unreadable: dict[int, str]  # unit -> error note, for text that is not UTF-8
    last_of_shard: bool


@dataclass(frozen=True)
class InferredWindow:
    """A prepared window with the model's decoded results and each row's error note (``None``: a result)."""

    prepared: PreparedWindow
    results: WindowResults
    errors: list[str | None]
    null: np.ndarray  # bool per unit: no result (null text, unreadable text, or a failed inference)


@dataclass(frozen=True)
class ComputedWindow:
    """A window's output rows and counts, on their way to the writer."""

    shard: Shard
    index: int
    table: pa.Table
    error_rows: int
    truncated_rows: int
    tokens: int
    last_of_shard: bool
    input_rows: int = -1  # rows read (``table`` has one per chunk with --chunking rows); -1: table.num_rows

    @property
    def rows_read(self) -> int:
        return self.table.num_rows if self.input_rows < 0 else self.input_rows


@dataclass(frozen=True)
class LoadedModel:
    """What running and decoding a window needs from the model directory, loaded once per process."""

    manifest: Manifest
    runner: Runner
    vocabulary: list[str]  # token strings by id


def prepare_shard(plan: WindowPlan, tokenizer: object, input_file: InputFile, shard: Shard) -> Iterator[PreparedWindow]:
    """Read a shard's windows and prepare each one, streaming: at most two windows of the shard are read at once."""
    tables = read_shard(input_file, shard, plan.window_rows)
    table, index = next(tables, None), 0
    while table is not None:
        following = next(tables, None)  # one ahead, to know the last window of the shard
        yield prepare_window(plan, tokenizer, shard, index, table, last_of_shard=following is None)
        table, index = following, index + 1


def prepare_window(
    plan: WindowPlan, tokenizer: object, shard: Shard, index: int, table: pa.RecordBatch, last_of_shard: bool
) -> PreparedWindow:
    """Tokenize a window's text (and pair) column, plan its batches (length-sorted, by rows and tokens) and pad them."""
    tokens, unreadable = tokenize_table(plan, tokenizer, table)
    return batch_window(plan, shard, index, table, tokens, unreadable, last_of_shard)


def tokenize_table(plan: WindowPlan, tokenizer: object, table: pa.RecordBatch) -> tuple[TokenizedRows, dict[int, str]]:
    """Tokenize a window's text (and pair) column into its model units (rows, or chunks of rows);
    also returns unit -> note for text that is not UTF-8.

    ``table`` needs only the text columns (the Ray engine tokenizes where it has read no other).
    """
    unreadable: dict[int, str] = {}
    texts, invalid = column_texts(table.column(plan.text_column))
    unreadable.update((row, f"invalid UTF-8 in column {plan.text_column!r}") for row in invalid)
    pairs = None
    if plan.text_pair_column:
        pairs, invalid = column_texts(table.column(plan.text_pair_column))
        unreadable.update((row, f"invalid UTF-8 in column {plan.text_pair_column!r}") for row in invalid)
    if plan.with_offsets:
        tokens, chunks = tokenize_window(tokenizer, texts, pairs, True, plan.stride is not None), None  # type: ignore[arg-type]
    else:
        tokens, chunks = tokenize_units(plan.text or TextPlan(plan.max_length), tokenizer, texts, pairs)  # type: ignore[arg-type]
    if chunks is not None:
        # Units are chunks: an unreadable (null) row is one unit, its first.
        first_unit = np.searchsorted(chunks.row, np.arange(table.num_rows))
        unreadable = {int(first_unit[row]): note for row, note in unreadable.items()}
    return tokens, unreadable


def batch_window(
    plan: WindowPlan,
    shard: Shard,
    index: int,
    table: pa.RecordBatch,
    tokens: TokenizedRows,
    unreadable: dict[int, str],
    last_of_shard: bool,
) -> PreparedWindow:
    """A tokenized window's batches, planned and padded: the window ready to run."""
    skip = plan.text.pooling_skip if plan.text is not None else None
    batches = [
        with_pooling_skip(batch, skip)
        for batch in iter_padded_batches(
            tokens.token_ids, tokens.type_ids, plan.pad_id, plan.batch_size, plan.max_tokens, multiple_of=plan.pad_multiple
        )
    ]
    return PreparedWindow(shard, index, table, tokens, batches, unreadable, last_of_shard)


def compute_window(plan: WindowPlan, model: LoadedModel, window: PreparedWindow) -> ComputedWindow:
    """Run, decode and finish a prepared window (the engines that need no stage between them)."""
    return finish_window(plan, run_window(plan, model, window))


def run_window(plan: WindowPlan, model: LoadedModel, window: PreparedWindow) -> InferredWindow:
    """Run every batch of a window; a failing batch is split until the bad row is isolated.

    A row whose inference fails gets an error note and no result; a window where every row fails
    raises ``InferenceBroken``.
    """
    tokens = window.tokens
    null = tokens.null.copy()
    results = WindowResults(model.manifest, len(null), plan.top_k, model.vocabulary, plan.decode, tokens.offsets)
    null_note = f"null text in column {' or '.join(repr(column) for column in plan.text_columns)}"
    errors: list[str | None] = [null_note if row_is_null else None for row_is_null in null]
    for row, note in window.unreadable.items():  # read as null, but say why
        errors[row] = note
    for batch in window.batches:
        _run_splitting(model.runner, batch, results, errors, null, tokens)
    _refuse_systemic_failure(errors, window.unreadable, len(null) - int(null.sum()))
    return InferredWindow(window, results, errors, null)


def finish_window(plan: WindowPlan, window: InferredWindow) -> ComputedWindow:
    """The window's output rows (see ``worker/output_rows.py`` for the columns) and counts."""
    prepared = window.prepared
    tokens = prepared.tokens
    table = prepared.table
    if not plan.keep_text:
        table = table.drop_columns([plan.text_column])
    embedding = plan.embedding
    pooled = None
    if embedding is not None:
        results = window.results.embedding
        pooled = results if results is not None else np.zeros((len(tokens.token_ids), embedding.model_dimensions), np.float32)
    # One unit per row, except chunks (--chunking) and a token classifier's windows (--stride).
    units = TokenizedRows(tokens.row_token_ids(), tokens.type_ids, tokens.truncated, window.null, tokens.chunks)
    output = assemble_table(
        table, window.results.columns(window.null, tokens.token_ids, window.errors), units, tokens.chunks, plan.chunking, pooled, embedding
    )
    if embedding is not None and embedding.metadata():
        output = output.replace_schema_metadata(embedding.metadata())  # the shards' key-value metadata
    return ComputedWindow(
        shard=prepared.shard,
        index=prepared.index,
        table=output,
        error_rows=output.num_rows - output.column("error").null_count,
        truncated_rows=int(tokens.truncated.sum()),
        tokens=int(np.sum(tokens.lengths)),
        last_of_shard=prepared.last_of_shard,
        input_rows=prepared.table.num_rows,
    )


def _refuse_systemic_failure(errors: list[str | None], unreadable: dict[int, str], succeeded: int) -> None:
    # One bad row is an error row; a model that fails on every row of a window is broken
    # (a lost device, a bad install) and must stop the job, not turn a dataset into error rows.
    failed = [note for row, note in enumerate(errors) if note and note.startswith(INFERENCE_FAILED) and row not in unreadable]
    if len(failed) >= SYSTEMIC_FAILURE_ROWS and succeeded == 0:
        raise InferenceBroken(
            f"the model failed on all {len(failed)} rows of a window ({failed[-1]}); finished shards are kept, "
            "fix the device or model and run again to resume"
        )


def _run_splitting(
    runner: Runner, batch: PaddedBatch, results: WindowResults, errors: list[str | None], null: np.ndarray, tokens: TokenizedRows
) -> None:
    try:
        outputs = runner.run(batch)
    except Exception as error:  # onnxruntime raises its own types for OOM and kernel failures
        if len(batch.rows) == 1:
            row = tokens.row_of(int(batch.rows[0]))  # with --stride, one of the row's windows
            errors[row] = f"{INFERENCE_FAILED}{type(error).__name__}: {error}"
            null[row] = True
            return
        half = len(batch.rows) // 2
        for part in (slice(0, half), slice(half, None)):
            _run_splitting(runner, _sub_batch(batch, part), results, errors, null, tokens)
        return
    results.add(batch, outputs)


def _sub_batch(batch: PaddedBatch, part: slice) -> PaddedBatch:
    mask = batch.attention_mask[part]
    width = max(1, int(mask.sum(axis=1).max()))
    pooling = None if batch.pooling_mask is None else batch.pooling_mask[part, :width]
    return PaddedBatch(batch.rows[part], batch.input_ids[part, :width], mask[:, :width], batch.token_type_ids[part, :width], pooling)
