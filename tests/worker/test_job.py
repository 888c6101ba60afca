"""``run_job`` end to end on the tiny exports, against PyTorch outputs computed here with transformers.

The inputs have several row groups, texts of very different lengths in an order
that length-sorting permutes, and small batches, so a result that lands on the
wrong row, or a padding mistake, shows up as a mismatch against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import LABELS, TokenPipelineReference, TorchReference, minilm_dir
from exporter.export import ExportResult
from worker.batching import PaddedBatch
from worker.config import RunConfig
from worker.decode import ENTITY_TYPE
from worker.errors import InputError, InputSchemaError, JobLocked, OutputConflict, UsageError
from worker.job import run_job
from worker.jobstate import OutputLock
from worker.modeldir.manifest import TASKS
from worker.runner import Runner

WORDS = (
    "the river runs past old stone houses where children play football in narrow streets while their "
    "parents talk about the weather the harvest and the price of bread at the market near the temple"
).split()
KATHMANDU = 28045  # "kathmandu" in bert-base-uncased


def sentence(words: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(words))


# Word counts chosen so that length-sorting reorders the rows; one text per token is
# a common English word, so the longest row (100 words) stays inside the tiny
# models' 128 positions. None is a null text, "" an empty one.
TEXTS: list[str | None] = [
    sentence(n, start) if n is not None else None
    for start, n in enumerate([3, 70, 0, 12, None, 100, 1, 33, 5, 48, 9, 2, 21, None, 64, 7, 15, 88, 4, 27, 0, 40, 6])
]
TEXTS[8] = "i love kathmandu"

# Zero, one and several [MASK]s per row, of different lengths.
MASKED: list[str | None] = [
    "the river [MASK] past old stone houses",
    sentence(40) + " [MASK] " + sentence(20, 3) + " [MASK] and [MASK]",
    "no mask in this row",
    None,
    "[MASK]",
    "",
    sentence(5, 7) + " [MASK] [MASK] " + sentence(60, 1),
    "children play [MASK] in narrow streets",
    sentence(90),
    "where [MASK] talk about the weather",
]

BATCHING = {"batch_size": 3, "max_tokens": 128, "rows_per_shard": 8, "read_batch_rows": 5}


def input_table(texts: Sequence[str | None], pairs: Sequence[str | None] | None = None, first_id: int = 0) -> pa.Table:
    """The texts plus passthrough columns of several types; the text column sits in the middle."""
    n = len(texts)
    columns: dict[str, pa.Array] = {
        "id": pa.array(range(first_id, first_id + n), pa.int64()),
        "text": pa.array(texts, pa.string()),
        "meta": pa.array([{"source": f"s{i % 3}", "weight": i / 2} for i in range(n)]),
        "tags": pa.array([list(range(i % 4)) if i % 5 else None for i in range(n)], pa.list_(pa.int32())),
        "seen_at": pa.array(
            [datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=7 * i) for i in range(n)],
            pa.timestamp("us", tz="UTC"),
        ),
        "score_in": pa.array([None if i % 3 == 0 else i * 0.25 for i in range(n)], pa.float64()),
    }
    if pairs is not None:
        columns["pair"] = pa.array(pairs, pa.string())
    return pa.table(columns)


def write_input(path: Path, table: pa.Table, row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_config(export: ExportResult, source: Path | str, output: Path, **options: Any) -> RunConfig:
    return RunConfig(model_dir=export.directory, input=str(source), output=output, text_column="text", **{**BATCHING, **options})


def read_output(output: Path) -> pa.Table:
    # Job bookkeeping files start with "_" or ".", which Arrow datasets skip.
    table = ds.dataset(output, format="parquet").to_table()
    assert table.equals(pq.read_table(output))
    return table


def assert_passed_through(output: pa.Table, source: pa.Table, text_column: str = "text") -> None:
    kept = source.drop_columns([text_column])
    assert output.select(kept.column_names).equals(kept)
    assert output.column_names[: kept.num_columns] == kept.column_names


@pytest.fixture
def batches_seen(monkeypatch: pytest.MonkeyPatch) -> list[PaddedBatch]:
    """Every batch that reaches the model."""
    seen: list[PaddedBatch] = []
    original = Runner.run

    def spy(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        seen.append(batch)
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", spy)
    return seen


def expected_embeddings(reference: TorchReference, texts: Sequence[str | None], max_length: int) -> list[np.ndarray | None]:
    return [None if text is None else reference.embed(text, max_length=max_length) for text in texts]


def assert_embeddings(got: list[list[float] | None], expected: list[np.ndarray | None]) -> None:
    assert len(got) == len(expected)
    for row, (vector, reference) in enumerate(zip(got, expected)):
        if reference is None:
            assert vector is None, f"row {row}"
        else:
            assert vector is not None, f"row {row}"
            np.testing.assert_allclose(np.asarray(vector), reference, atol=1e-4, err_msg=f"row {row}")


def test_every_task_has_an_end_to_end_test() -> None:
    tested = {"embed", "classify", "fill-mask", "token-classify"}
    assert tested == set(TASKS), f"tasks without a run_job test here: {set(TASKS) - tested}"


def test_embed_matches_pytorch_row_for_row(
    tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference, batches_seen: list[PaddedBatch]
) -> None:
    source = input_table(TEXTS)
    output = tmp_path / "out"
    summary = run_job(make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", source), output))
    result = read_output(output)

    assert result.num_rows == summary.rows == len(TEXTS)
    assert_passed_through(result, source)
    assert result.column_names[-2:] == ["embedding", "error"]
    assert result.schema.field("embedding").type == pa.list_(pa.float32(), tiny_embed_export.manifest.embedding_dim)
    max_length = tiny_embed_export.manifest.max_length
    assert_embeddings(result.column("embedding").to_pylist(), expected_embeddings(embed_reference, TEXTS, max_length))
    # A null text is a null result with a note; an empty string is ordinary input.
    notes = result.column("error").to_pylist()
    assert [note is not None for note in notes] == [text is None for text in TEXTS]
    assert all("null text" in note and "'text'" in note for note in notes if note is not None)
    assert summary.error_rows == TEXTS.count(None)
    assert summary.truncated_rows == 0
    assert summary.tokens == sum(embed_reference.token_count(text or "") for text in TEXTS)

    # The run really was cut into many small, length-sorted batches and several shards.
    assert len(batches_seen) >= 10
    assert all(len(batch.rows) <= 3 for batch in batches_seen)
    assert all(batch.input_ids.size <= 128 for batch in batches_seen if len(batch.rows) > 1)
    assert any(np.any(np.diff(batch.rows) != 1) for batch in batches_seen)
    # On CPU a batch is exactly as wide as its longest row (no rounding up to a multiple of 8).
    assert all(batch.input_ids.shape[1] == batch.attention_mask.sum(axis=1).max() for batch in batches_seen)
    parts = sorted(path.name for path in output.glob("part-*.parquet"))
    assert len(parts) == summary.shards_written == 3
    assert not [path for path in output.iterdir() if ".tmp-" in path.name]
    assert (output / "_SUCCESS").is_file()


def test_classify_matches_pytorch_with_label_names(
    tmp_path: Path, tiny_decisive_classify_export: ExportResult, classify_reference: TorchReference
) -> None:
    source = input_table(TEXTS)
    output = tmp_path / "out"
    run_job(make_config(tiny_decisive_classify_export, write_input(tmp_path / "in.parquet", source), output))
    result = read_output(output)

    assert_passed_through(result, source)
    assert result.column_names[-6:] == ["label", "label_id", "score", "probs", "logits", "error"]
    assert result.schema.field("label").type == pa.string()
    assert result.schema.field("label_id").type == pa.int64()
    assert pa.types.is_floating(result.schema.field("score").type)
    assert pa.types.is_list(result.schema.field("probs").type)
    max_length = tiny_decisive_classify_export.manifest.max_length
    for row, (text, got) in enumerate(zip(TEXTS, result.to_pylist())):
        if text is None:
            assert (got["label"], got["label_id"], got["score"], got["probs"]) == (None, None, None, None)
            assert "null text" in got["error"]
            continue
        expected = classify_reference.classify(text, max_length=max_length)
        np.testing.assert_allclose(got["probs"], expected, atol=1e-5, err_msg=f"row {row}")
        assert got["label_id"] == int(np.argmax(expected)), f"row {row}"
        assert got["label"] == LABELS[int(np.argmax(expected))]
        assert got["score"] == pytest.approx(float(np.max(expected)), abs=1e-5)
        assert got["error"] is None
    assert set(result.column("label").to_pylist()) == {*LABELS.values(), None}


def test_token_classify_matches_the_pipeline_row_for_row(
    tmp_path: Path, tiny_token_classify_export: ExportResult, token_classify_reference: TokenPipelineReference
) -> None:
    source = input_table(TEXTS)
    output = tmp_path / "out"
    summary = run_job(make_config(tiny_token_classify_export, write_input(tmp_path / "in.parquet", source), output))
    result = read_output(output)

    assert_passed_through(result, source)
    assert result.column_names[-2:] == ["entities", "error"]
    assert result.schema.field("entities").type == pa.list_(ENTITY_TYPE)
    max_length = tiny_token_classify_export.manifest.max_length
    for row, (text, got) in enumerate(zip(TEXTS, result.to_pylist())):
        if text is None:
            assert got["entities"] is None and "null text" in got["error"]
            continue
        expected = token_classify_reference.entities(text, max_length=max_length)
        assert [(e["label"], e["start"], e["end"]) for e in got["entities"]] == [e[:1] + e[2:] for e in expected], f"row {row}"
        np.testing.assert_allclose([e["score"] for e in got["entities"]], [e[1] for e in expected], atol=1e-5)
        assert all(e["text"] == text[e["start"] : e["end"]] for e in got["entities"])
        assert got["error"] is None
    assert summary.error_rows == TEXTS.count(None)
    assert sum(len(entities or []) for entities in result.column("entities").to_pylist()) > len(TEXTS)


def assert_fills(
    got: list[list[dict[str, Any]]] | None, expected: list[tuple[list[int], list[float]]] | None, vocabulary: Any, row: int
) -> None:
    if expected is None:
        assert got is None, f"row {row}"
        return
    assert got is not None and len(got) == len(expected), f"row {row}: one entry per [MASK]"
    for fills, (ids, scores) in zip(got, expected):
        assert [fill["token_id"] for fill in fills] == ids, f"row {row}"
        assert [fill["token"] for fill in fills] == vocabulary.convert_ids_to_tokens(ids)
        got_scores = [fill["score"] for fill in fills]
        # The tiny model's probabilities are all near 1/30522: compare them relatively.
        np.testing.assert_allclose(got_scores, scores, rtol=1e-3, atol=1e-9, err_msg=f"row {row}")
        assert got_scores == sorted(got_scores, reverse=True)


@pytest.mark.parametrize("top_k", [None, 2])
def test_fill_mask_matches_pytorch_top_k_at_every_mask(
    tmp_path: Path, tiny_fill_mask_export: ExportResult, fill_mask_reference: TorchReference, top_k: int | None
) -> None:
    source = input_table(MASKED)
    output = tmp_path / "out"
    run_job(make_config(tiny_fill_mask_export, write_input(tmp_path / "in.parquet", source, row_group_size=3), output, top_k=top_k))
    result = read_output(output)

    assert_passed_through(result, source)
    assert result.column_names[-2:] == ["fills", "error"]
    manifest = tiny_fill_mask_export.manifest
    k = top_k or manifest.top_k
    assert k is not None
    fills = result.column("fills").to_pylist()
    for row, text in enumerate(MASKED):
        expected = None if text is None else fill_mask_reference.fill_mask(text, max_length=manifest.max_length, top_k=k)
        assert_fills(fills[row], expected, fill_mask_reference.tokenizer, row)
    assert [len(row or []) for row in fills] == [1, 3, 0, 0, 1, 0, 2, 1, 0, 1]
    assert [note is not None for note in result.column("error").to_pylist()] == [text is None for text in MASKED]


def test_text_pairs_are_encoded_as_two_segments(
    tmp_path: Path, tiny_decisive_classify_export: ExportResult, classify_reference: TorchReference
) -> None:
    texts = [sentence(n, n) for n in (4, 30, 1, 9, 17, 2)]
    pairs: list[str | None] = [sentence(n, 2 * n) for n in (25, 1, 6, 40, 5, 3)]
    pairs[4] = None
    pairs[5] = ""
    source = input_table(texts, pairs)
    output = tmp_path / "out"
    run_job(make_config(tiny_decisive_classify_export, write_input(tmp_path / "in.parquet", source), output, text_pair_column="pair"))
    result = read_output(output)

    assert "pair" in result.column_names  # the second segment is passed through
    assert_passed_through(result, source)
    max_length = tiny_decisive_classify_export.manifest.max_length
    for row, (text, pair, got) in enumerate(zip(texts, pairs, result.to_pylist())):
        if pair is None:
            assert got["probs"] is None and got["label"] is None
            assert "'text' or 'pair'" in got["error"]
            continue
        expected = classify_reference.classify(text, pair, max_length=max_length)
        np.testing.assert_allclose(got["probs"], expected, atol=1e-5, err_msg=f"row {row}")
        # The pair matters: the same text alone scores differently.
        alone = classify_reference.classify(text, max_length=max_length)
        assert not np.allclose(alone, expected, atol=1e-3)


def test_max_length_truncates_and_counts_truncated_rows(
    tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference
) -> None:
    output = tmp_path / "out"
    summary = run_job(make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS)), output, max_length=16))
    long_rows = sum(embed_reference.token_count(text) > 16 for text in TEXTS if text is not None)
    assert 0 < long_rows < len(TEXTS)
    assert summary.truncated_rows == long_rows
    result = read_output(output)
    assert_embeddings(result.column("embedding").to_pylist(), expected_embeddings(embed_reference, TEXTS, 16))


@pytest.mark.parametrize("form", ["directory", "glob"])
def test_several_files_are_read_in_sorted_order_rows_in_order(
    tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference, form: str
) -> None:
    inputs = tmp_path / "inputs"
    # Written out of name order, each with its own ids.
    parts = {"b.parquet": TEXTS[:9], "a.parquet": TEXTS[9:], "c.parquet": TEXTS[3:8]}
    firsts = {"b.parquet": 100, "a.parquet": 0, "c.parquet": 200}
    for name, texts in parts.items():
        write_input(inputs / name, input_table(texts, first_id=firsts[name]), row_group_size=3)
    output = tmp_path / "out"
    source = inputs if form == "directory" else inputs / "*.parquet"
    summary = run_job(make_config(tiny_embed_export, source, output))

    result = read_output(output)
    ordered = ["a.parquet", "b.parquet", "c.parquet"]
    assert result.column("id").to_pylist() == [firsts[name] + i for name in ordered for i in range(len(parts[name]))]
    texts = [text for name in ordered for text in parts[name]]
    assert summary.rows == len(texts)
    max_length = tiny_embed_export.manifest.max_length
    assert_embeddings(result.column("embedding").to_pylist(), expected_embeddings(embed_reference, texts, max_length))


def part_files(output: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in output.glob("part-*.parquet")}


def test_a_rerun_of_a_finished_job_does_nothing(tmp_path: Path, tiny_embed_export: ExportResult, batches_seen: list[PaddedBatch]) -> None:
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS)), tmp_path / "out")
    first = run_job(config)
    written = part_files(config.output)
    before = read_output(config.output)
    calls = len(batches_seen)

    again = run_job(replace(config, batch_size=7, max_tokens=None))  # speed options may change
    assert again.already_complete
    assert (again.rows, again.shards_written, again.shards_skipped) == (0, 0, first.shards_written)
    assert len(batches_seen) == calls
    assert part_files(config.output) == written
    assert read_output(config.output).equals(before)


def test_different_parameters_conflict_and_overwrite_replaces(
    tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference
) -> None:
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS)), tmp_path / "out")
    run_job(config)
    written = part_files(config.output)

    with pytest.raises(OutputConflict, match="max_length"):
        run_job(replace(config, max_length=16))
    assert part_files(config.output) == written

    summary = run_job(replace(config, max_length=16, rows_per_shard=100, overwrite=True))
    assert not summary.already_complete and summary.truncated_rows > 0
    assert sorted(part_files(config.output)) == ["part-00000-00000.parquet"]
    result = read_output(config.output)
    assert_embeddings(result.column("embedding").to_pylist(), expected_embeddings(embed_reference, TEXTS, 16))


def test_a_non_empty_directory_without_a_job_is_not_written_into(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "important.csv").write_text("keep me")
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS[:3])), output)
    with pytest.raises(OutputConflict, match="not empty"):
        run_job(config)
    assert sorted(path.name for path in output.iterdir() if not path.name.startswith(".")) == ["important.csv"]


def test_a_second_job_on_the_same_output_is_locked_out(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    output = tmp_path / "out"
    output.mkdir()
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS)), output)
    with OutputLock(output):
        with pytest.raises(JobLocked, match="another bertbatch run"):
            run_job(config)
    assert not list(output.glob("*.parquet"))
    assert not run_job(config).already_complete  # the lock is released with the holder


def test_a_failing_batch_is_split_until_only_the_bad_row_fails(
    tmp_path: Path, tiny_embed_export: ExportResult, embed_reference: TorchReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Runner.run
    calls: list[int] = []

    def fail_on_kathmandu(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        calls.append(len(batch.rows))
        if (batch.input_ids == KATHMANDU).any():
            raise RuntimeError("simulated kernel failure")
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", fail_on_kathmandu)
    output = tmp_path / "out"
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS)), output, batch_size=8, max_tokens=None)
    summary = run_job(config)

    result = read_output(output)
    bad = TEXTS.index("i love kathmandu")
    notes = result.column("error").to_pylist()
    assert "inference failed" in notes[bad] and "simulated kernel failure" in notes[bad]
    assert [i for i, note in enumerate(notes) if note is not None] == sorted([bad] + [i for i, t in enumerate(TEXTS) if t is None])
    assert summary.error_rows == 1 + TEXTS.count(None)
    assert 1 in calls and max(calls) > 1
    expected = expected_embeddings(embed_reference, TEXTS, tiny_embed_export.manifest.max_length)
    expected[bad] = None
    assert_embeddings(result.column("embedding").to_pylist(), expected)


def test_input_errors_happen_before_any_output_is_written(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    inputs = tmp_path / "inputs"
    write_input(inputs / "a.parquet", input_table(TEXTS))
    output = tmp_path / "out"
    with pytest.raises(InputSchemaError, match="'body'") as raised:
        run_job(replace(make_config(tiny_embed_export, inputs, output), text_column="body"))
    assert str(inputs / "a.parquet") in str(raised.value)
    assert not output.exists()

    (inputs / "z.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(InputError, match="z.parquet"):
        run_job(make_config(tiny_embed_export, inputs, output))
    assert not output.exists()


def test_an_input_column_named_like_a_result_is_refused(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    source = input_table(TEXTS[:3]).append_column("error", pa.array(["x", "y", "z"]))
    with pytest.raises(InputSchemaError, match="error"):
        run_job(make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", source), tmp_path / "out"))
    assert not (tmp_path / "out" / "part-00000-00000.parquet").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"top_k": 2}, "--top-k"), ({"max_length": 1000}, "--max-length"), ({"batch_size": 0}, "--batch-size")],
)
def test_options_the_model_cannot_honour_are_usage_errors(
    tmp_path: Path, tiny_embed_export: ExportResult, options: dict[str, Any], message: str
) -> None:
    config = make_config(tiny_embed_export, write_input(tmp_path / "in.parquet", input_table(TEXTS[:3])), tmp_path / "out", **options)
    with pytest.raises(UsageError, match=message):
        run_job(config)


@pytest.mark.slow
def test_minilm_embeddings_equal_sentence_transformers(tmp_path: Path, minilm_export: ExportResult) -> None:
    from sentence_transformers import SentenceTransformer

    long_text = " ".join(["the quick brown fox jumps over the lazy dog near the riverbank"] * 30)  # > 256 tokens
    texts = [
        "i love kathmandu",
        "Sinan loves a beautiful day",
        "",
        "A man is playing a guitar.",
        "The new movie is awesome!",
        "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
        "¿Dónde está la biblioteca?",
        "東京は日本の首都です。",
        "Emojis 🙂🚀 and punctuation!!! ... ???",
        long_text,
        "short",
        "The cat sits outside",
        "A woman is slicing tomatoes in the kitchen while the radio plays jazz.",
        "Stock markets fell sharply on Monday after the central bank raised interest rates.",
        "def add(a, b): return a + b",
        "   leading and trailing spaces   ",
        "UPPER CASE TEXT SHOULD BE LOWERED",
        "Numbers like 3.14159 and 2,718 and 1e-9",
        "a " * 120,
        "The mitochondria is the powerhouse of the cell.",
    ]
    output = tmp_path / "out"
    summary = run_job(make_config(minilm_export, write_input(tmp_path / "in.parquet", input_table(texts)), output, batch_size=4, max_tokens=1024))
    got = np.asarray(read_output(output).column("embedding").to_pylist(), dtype=np.float32)

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = model.encode(texts, convert_to_numpy=True)
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min()} at row {int(cosine.argmin())}"
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert model.max_seq_length == minilm_export.manifest.max_length == 256
    too_long = sum(len(model.tokenizer(text)["input_ids"]) > 256 for text in texts)
    assert summary.truncated_rows == too_long == 1
