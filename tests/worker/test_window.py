"""The window pipeline without a model: planning, preparing (tokenize + pad), running with a fake session,
decoding every task, and finishing the output rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelless import (
    CLS,
    LABELS,
    MASK,
    PAD,
    SEP,
    TOP_K,
    VOCABULARY,
    FakeRunner,
    embedding_of,
    fills_of,
    ids,
    manifest,
    probs_of,
    save_tokenizer,
)
from tokenizers import Tokenizer

from worker.batching import PaddedBatch
from worker.config import BATCH_LIMITS, RunConfig
from worker.errors import InferenceBroken
from worker.modeldir.manifest import Manifest
from worker.source import Shard, inspect_inputs, plan_shards
from worker.tokenize import load_tokenizer
from worker.window import (
    INFERENCE_FAILED,
    SYSTEMIC_FAILURE_ROWS,
    LoadedModel,
    PreparedWindow,
    WindowPlan,
    compute_window,
    finish_window,
    plan_windows,
    prepare_shard,
    prepare_window,
    run_window,
)

CONFIG = RunConfig(model_dir=Path("m"), input="in.parquet", output=Path("out"), text_column="text")
EMBED = manifest("embed")
SHARD = Shard(file_index=0, shard_index=0, row_groups=(0,), num_rows=0)
TEXTS = ["the quick brown fox", None, "a dog", "the lazy dog jumps over the fox", "kathmandu", "fox"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(save_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"), max_length=8)


def plan(**options: object) -> WindowPlan:
    return plan_windows(replace(CONFIG, **options), EMBED, 8, on_gpu=False)  # type: ignore[arg-type]


def window_of(texts: Sequence[str | None], **columns: list[object]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"id": list(range(len(texts))), "text": pa.array(texts, pa.string()), **columns})


def model_for(task_manifest: Manifest, runner: FakeRunner | None = None) -> LoadedModel:
    return LoadedModel(task_manifest, runner or FakeRunner(task_manifest), VOCABULARY)


def test_padding_multiple_by_device() -> None:
    assert plan_windows(CONFIG, EMBED, 16, on_gpu=False).pad_multiple == 1
    assert plan_windows(CONFIG, EMBED, 16, on_gpu=True).pad_multiple == 8  # tensor cores
    assert plan_windows(replace(CONFIG, pad_multiple=16), EMBED, 16, on_gpu=True).pad_multiple == 16


def test_the_plan_takes_the_batch_limits_the_user_left_open_from_the_device() -> None:
    for on_gpu, device in ((False, "cpu"), (True, "cuda")):
        default = plan_windows(CONFIG, EMBED, 16, on_gpu=on_gpu)
        assert (default.batch_size, default.max_tokens) == BATCH_LIMITS[device]
    given = plan_windows(replace(CONFIG, batch_size=7, max_tokens=300, top_k=2, text_pair_column="b", keep_text=True), EMBED, 12, on_gpu=True)
    assert (given.batch_size, given.max_tokens, given.top_k, given.max_length) == (7, 300, 2, 12)
    assert (given.pad_id, given.window_rows, given.keep_text, given.text_columns) == (PAD, CONFIG.read_batch_rows, True, ["text", "b"])


def test_a_prepared_window_holds_known_token_ids_in_length_sorted_padded_batches(tokenizer: Tokenizer) -> None:
    window = prepare_window(plan(batch_size=2, pad_multiple=4), tokenizer, SHARD, 3, window_of(TEXTS), last_of_shard=True)
    assert (window.shard, window.index, window.last_of_shard) == (SHARD, 3, True)
    assert window.tokens.token_ids[0] == ids("the quick brown fox")
    assert window.tokens.token_ids[1] == [CLS, SEP]  # a null text is tokenized as empty and flagged
    assert window.tokens.null.tolist() == [False, True, False, False, False, False]
    # max_length 8 truncates the 9-token row (its last word, keeping [SEP]).
    assert window.tokens.token_ids[3] == ids("the lazy dog jumps over the")
    assert window.tokens.truncated.tolist() == [False, False, False, True, False, False]
    assert window.tokens.type_ids is None
    # Longest first, at most 2 rows a batch, widths rounded up to a multiple of 4, right-padded.
    assert [batch.rows.tolist() for batch in window.batches] == [[3, 0], [2, 4], [5, 1]]
    assert [batch.input_ids.shape for batch in window.batches] == [(2, 8), (2, 4), (2, 4)]
    last = window.batches[-1]
    np.testing.assert_array_equal(last.input_ids, [[*ids("fox"), PAD], [CLS, SEP, PAD, PAD]])
    np.testing.assert_array_equal(last.attention_mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    rows = sorted(row for batch in window.batches for row in batch.rows.tolist())
    assert rows == list(range(len(TEXTS)))


def test_a_token_budget_cuts_batches_by_padded_tokens(tokenizer: Tokenizer) -> None:
    window = prepare_window(plan(batch_size=64, max_tokens=12, pad_multiple=1), tokenizer, SHARD, 0, window_of(TEXTS), False)
    for batch in window.batches:
        assert batch.input_ids.size <= 12 or len(batch.rows) == 1
    assert [batch.rows.tolist() for batch in window.batches] == [[3], [0, 2], [4, 5, 1]]  # 8, 2 x 6, 3 x 3 tokens


def test_pairs_get_their_segment_ids_and_unreadable_text_is_a_noted_null(tokenizer: Tokenizer) -> None:
    table = pa.RecordBatch.from_pydict({
        # A string column holding bytes that are not UTF-8 (Parquet writers need not check).
        "text": pa.array([b"the fox", b"a \xff dog", b"dog"], pa.binary()).view(pa.string()),
        "second": pa.array(["lazy dog", "fox", None], pa.string()),
    })
    window = prepare_window(plan(text_pair_column="second"), tokenizer, SHARD, 0, table, True)
    assert window.tokens.token_ids[0] == ids("the fox", "lazy dog")
    assert window.tokens.type_ids is not None and window.tokens.type_ids[0] == [0, 0, 0, 0, 1, 1, 1]
    assert window.unreadable == {1: "invalid UTF-8 in column 'text'"}
    assert window.tokens.null.tolist() == [False, True, True]


def test_prepare_shard_cuts_a_shard_into_windows_of_the_planned_rows(tmp_path: Path, tokenizer: Tokenizer) -> None:
    texts = [f"the fox {'dog ' * (i % 4)}" for i in range(10)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet", row_group_size=5)
    files = inspect_inputs([tmp_path / "in.parquet"], "text", None, None)
    shards = plan_shards(files, rows_per_shard=10)
    windows = list(prepare_shard(plan(read_batch_rows=4), tokenizer, files[0], shards[0]))
    assert [(w.index, w.table.num_rows, w.last_of_shard) for w in windows] == [(0, 4, False), (1, 4, False), (2, 2, True)]
    assert [w.tokens.token_ids for w in windows][2] == [ids(text) for text in texts[8:]]


def prepared(tokenizer: Tokenizer, texts: Sequence[str | None], task_plan: WindowPlan | None = None) -> PreparedWindow:
    return prepare_window(task_plan or plan(batch_size=2), tokenizer, SHARD, 0, window_of(texts), True)


def test_embeddings_come_back_in_row_order_with_nulls_and_counts(tokenizer: Tokenizer) -> None:
    window = prepared(tokenizer, TEXTS)
    computed = compute_window(plan(), model_for(EMBED), window)
    table = computed.table
    assert table.column_names == ["id", "num_tokens", "truncated", "embedding", "error"]  # the text column is dropped
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    expected = [None if text is None else embedding_of(window.tokens.token_ids[row]) for row, text in enumerate(TEXTS)]
    assert table.column("embedding").to_pylist() == expected
    assert table.column("error").to_pylist() == [None, "null text in column 'text'", None, None, None, None]
    assert (computed.error_rows, computed.truncated_rows) == (1, 1)
    assert computed.tokens == sum(len(row) for row in window.tokens.token_ids)
    lengths = [len(row) for row in window.tokens.token_ids]
    assert table.column("num_tokens").to_pylist() == [None if text is None else lengths[row] for row, text in enumerate(TEXTS)]
    assert table.column("truncated").to_pylist() == [None if text is None else bool(window.tokens.truncated[row]) for row, text in enumerate(TEXTS)]
    assert table.column("truncated").to_pylist().count(True) == 1
    assert (computed.shard, computed.index, computed.last_of_shard) == (SHARD, 0, True)


def test_keep_text_keeps_the_text_column_before_the_results(tokenizer: Tokenizer) -> None:
    kept = plan(keep_text=True)
    table = compute_window(kept, model_for(EMBED), prepared(tokenizer, TEXTS, kept)).table
    assert table.column_names == ["id", "text", "num_tokens", "truncated", "embedding", "error"]
    assert table.column("text").to_pylist() == TEXTS


def test_token_embeddings_are_cut_to_each_rows_real_tokens(tokenizer: Tokenizer) -> None:
    model = manifest("embed", token_embeddings=True)
    window = prepared(tokenizer, TEXTS)
    table = compute_window(plan(), model_for(model), window).table
    assert table.column_names == ["id", "num_tokens", "truncated", "embedding", "tokens", "token_embeddings", "error"]
    assert table.column("tokens").to_pylist()[0] == ["[CLS]", "the", "quick", "brown", "fox", "[SEP]"]
    assert table.column("tokens").to_pylist()[1] is None
    for row, vectors in enumerate(table.column("token_embeddings").to_pylist()):
        if TEXTS[row] is None:
            assert vectors is None
            continue
        row_ids = window.tokens.token_ids[row]
        assert vectors == [[float(token), float(position)] for position, token in enumerate(row_ids)]


def test_classification_decodes_labels_scores_and_probabilities(tokenizer: Tokenizer) -> None:
    model = manifest("classify")
    window = prepared(tokenizer, TEXTS)
    table = compute_window(plan(), model_for(model), window).table
    assert table.column_names == ["id", "num_tokens", "truncated", "label", "label_id", "score", "probs", "error"]
    for row, text in enumerate(TEXTS):
        got = {name: table.column(name)[row].as_py() for name in ("label", "label_id", "score", "probs")}
        if text is None:
            assert got == {"label": None, "label_id": None, "score": None, "probs": None}
            continue
        probs = probs_of(window.tokens.token_ids[row])
        label_id = int(np.argmax(probs))
        assert got["label"] == LABELS[label_id] and got["label_id"] == label_id
        assert got["score"] == pytest.approx(0.7) and got["probs"] == pytest.approx(probs)


def test_fills_come_per_mask_in_token_order_cut_to_top_k(tokenizer: Tokenizer) -> None:
    model = manifest("fill-mask")
    texts = ["the [MASK] fox", "no mask here", None, "[MASK] dog [MASK]"]
    window = prepared(tokenizer, texts)
    assert window.tokens.token_ids[3] == [CLS, MASK, ids("dog")[1], MASK, SEP]
    for top_k in (None, 1):
        fill_plan = plan(top_k=top_k)
        fills = compute_window(fill_plan, model_for(model), window).table.column("fills").to_pylist()
        k = top_k or TOP_K

        def expected(position: int) -> list[dict[str, object]]:
            return [{"token": VOCABULARY[token], "token_id": token, "score": pytest.approx(score)} for token, score in fills_of(position)[:k]]

        assert fills[0] == [expected(2)]
        assert fills[1] == []
        assert fills[2] is None
        assert fills[3] == [expected(1), expected(3)]


def test_a_failing_batch_is_split_until_the_bad_row_is_isolated(tokenizer: Tokenizer) -> None:
    bad = ids("kathmandu")[1]
    runner = FakeRunner(EMBED, fail=lambda batch: bool((batch.input_ids == bad).any()))
    window = prepared(tokenizer, TEXTS * 3, plan(batch_size=8))
    inferred = run_window(plan(), model_for(EMBED, runner), window)
    bad_rows = [row for row, text in enumerate(TEXTS * 3) if text == "kathmandu"]
    for row in bad_rows:
        assert inferred.errors[row] == f"{INFERENCE_FAILED}RuntimeError: out of memory for 1 rows"
        assert inferred.null[row]
    assert not window.tokens.null[bad_rows].any(), "running a window changes nothing in the prepared window"
    # Every other row ran (null texts too, as [CLS] [SEP]: their results are masked), in sub-batches free of bad rows.
    ran = sorted(row for batch in runner.batches for row in batch.rows.tolist())
    assert ran == [row for row, text in enumerate(TEXTS * 3) if text != "kathmandu"]
    computed = finish_window(plan(), inferred)
    assert computed.error_rows == 3 + len(bad_rows)  # nulls and failures
    assert computed.table.column("embedding").to_pylist()[0] == embedding_of(ids("the quick brown fox"))


def test_a_sub_batch_is_trimmed_to_its_own_longest_row() -> None:
    from worker.window import _sub_batch

    batch = PaddedBatch(
        np.array([4, 2]),
        np.array([[CLS, 9, 9, 9, SEP], [CLS, 9, SEP, PAD, PAD]]),
        np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        np.zeros((2, 5), np.int64),
    )
    second = _sub_batch(batch, slice(1, None))
    assert second.rows.tolist() == [2] and second.input_ids.tolist() == [[CLS, 9, SEP]]


def test_a_model_that_fails_on_every_row_of_a_window_stops_the_job(tokenizer: Tokenizer) -> None:
    broken = FakeRunner(EMBED, fail=lambda batch: True)
    many = ["the fox"] * SYSTEMIC_FAILURE_ROWS
    with pytest.raises(InferenceBroken, match=f"the model failed on all {SYSTEMIC_FAILURE_ROWS} rows of a window"):
        run_window(plan(), model_for(EMBED, broken), prepared(tokenizer, many))
    # A few failing rows are error rows, not a broken model.
    few = run_window(plan(), model_for(EMBED, broken), prepared(tokenizer, many[: SYSTEMIC_FAILURE_ROWS - 1]))
    assert all(note and note.startswith(INFERENCE_FAILED) for note in few.errors)
