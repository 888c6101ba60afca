"""`bertbatch run` on the heads of issue 11, end to end through the CLI: token-classify entities against
transformers' own pipeline for every aggregation (with and without --stride on a row longer than the
maximum length), the classify columns of rerankers and multi-label models, and the options' refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from conftest import TokenPipelineReference
from exporter.export import ExportConfig, ExportResult, export_model
from worker.cli import app
from worker.exit_codes import ExitCode

MAX_LENGTH = 32
STRIDE = 8
TEXTS: list[str | None] = [
    "Hugo Boss met Angela Merkel in Paris.",
    "tokenization of unbelievably antidisestablishmentarianism",  # words split into several subwords
    "Hello, world! (Really?) Yes: it's 3.14 -- or e-mail me@example.com.",  # punctuation
    "Zürich, Malmö, São Paulo, naïve café and cafe\u0301 with a combining accent",  # accents, NFD
    "東京は日本の首都です and 北京 too",  # CJK
    "launch 🚀🔥 now 👍🏽 ok",  # emoji
    "  a   b\t\tc\n\nd   spaced    out  ",  # runs of whitespace
    None,
    "",
    " ".join(["Angela Merkel met Hugo Boss in Zürich on a tokenization day, then flew to 東京 🚀."] * 4),  # > MAX_LENGTH
]
LONG_ROW = len(TEXTS) - 1


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def short_token_export(tmp_path_factory: pytest.TempPathFactory, tiny_token_classifier_checkpoint: Path) -> ExportResult:
    """The token classifier exported with a short maximum length, so one row needs several windows."""
    out = tmp_path_factory.mktemp("short") / "token-classify"
    config = ExportConfig(source=str(tiny_token_classifier_checkpoint), task="token-classify", out=out, max_length=MAX_LENGTH)
    return export_model(config, log=lambda line: None)


def write_texts(path: Path, texts: list[str | None], pairs: list[str | None] | None = None) -> Path:
    columns = {"id": pa.array(range(len(texts))), "text": pa.array(texts, pa.string())}
    if pairs is not None:
        columns["passage"] = pa.array(pairs, pa.string())
    pq.write_table(pa.table(columns), path, row_group_size=3)
    return path


def run(model: Path, source: Path, output: Path, *extra: object) -> pa.Table:
    result = invoke("run", "--model", model, "--input", source, "--output", output, "--text-column", "text", "--batch-size", 3, *extra)
    assert result.exit_code == 0, result.output
    return pq.read_table(output)


def assert_entities(got: list[dict[str, Any]] | None, expected: list[tuple[str, float, int, int]], text: str) -> None:
    assert got is not None, text
    assert [(e["label"], e["start"], e["end"]) for e in got] == [(label, start, end) for label, _, start, end in expected], text
    np.testing.assert_allclose([e["score"] for e in got], [score for _, score, _, _ in expected], rtol=0, atol=1e-5)
    assert all(e["text"] == text[e["start"] : e["end"]] for e in got)
    assert [e["start"] for e in got] == sorted(e["start"] for e in got)


@pytest.mark.parametrize("aggregation", ["none", "simple", "first", "average", "max"])
def test_entities_match_the_pipeline_for_every_aggregation(
    tmp_path: Path, short_token_export: ExportResult, token_classify_reference: TokenPipelineReference, aggregation: str
) -> None:
    source = write_texts(tmp_path / "in.parquet", TEXTS)
    table = run(short_token_export.directory, source, tmp_path / "out", "--aggregation", aggregation)
    rows = table.to_pylist()
    for text, row in zip(TEXTS, rows):
        if text is None:
            assert row["entities"] is None and "null text" in row["error"]
            continue
        assert row["error"] is None
        assert_entities(row["entities"], token_classify_reference.entities(text, aggregation=aggregation, max_length=MAX_LENGTH), text)
    assert rows[TEXTS.index("")]["entities"] == []

    if aggregation == "none":
        return
    # A row longer than the maximum length: --stride covers all of it, as the pipeline's own stride does.
    strided = run(short_token_export.directory, source, tmp_path / "strided", "--aggregation", aggregation, "--stride", STRIDE)
    for text, row in zip(TEXTS, strided.to_pylist()):
        if text is not None:
            expected = token_classify_reference.entities(text, aggregation=aggregation, max_length=MAX_LENGTH, stride=STRIDE)
            assert_entities(row["entities"], expected, text)
    long_text = TEXTS[LONG_ROW]
    assert long_text is not None
    reached = max(e["end"] for e in strided.column("entities")[LONG_ROW].as_py())
    truncated = max(e["end"] for e in table.column("entities")[LONG_ROW].as_py())
    assert reached > truncated + 100 and reached > len(long_text) - 10


def test_a_long_row_without_stride_is_truncated_and_counted(tmp_path: Path, short_token_export: ExportResult) -> None:
    source = write_texts(tmp_path / "in.parquet", TEXTS)
    result = invoke("run", "--model", short_token_export.directory, "--input", source, "--output", tmp_path / "out",
                    "--text-column", "text", "--log-format", "json")
    assert result.exit_code == 0, result.output
    assert '"truncated_rows": 1' in result.stdout
    result = invoke("run", "--model", short_token_export.directory, "--input", source, "--output", tmp_path / "strided",
                    "--text-column", "text", "--stride", STRIDE, "--log-format", "json")
    assert result.exit_code == 0, result.output
    assert '"truncated_rows": 0' in result.stdout
    cut, whole = pq.read_table(tmp_path / "out"), pq.read_table(tmp_path / "strided")
    assert cut.column("truncated")[LONG_ROW].as_py() is True and whole.column("truncated")[LONG_ROW].as_py() is False
    assert cut.column("num_tokens")[LONG_ROW].as_py() == MAX_LENGTH < whole.column("num_tokens")[LONG_ROW].as_py()
    assert cut.column("num_tokens").to_pylist()[:LONG_ROW] == whole.column("num_tokens").to_pylist()[:LONG_ROW]


def test_ignore_labels_match_the_pipeline(
    tmp_path: Path, short_token_export: ExportResult, token_classify_reference: TokenPipelineReference
) -> None:
    texts = [text for text in TEXTS[:4] if text]
    source = write_texts(tmp_path / "in.parquet", list(texts))
    for name, ignore in (("none", ""), ("some", "O,PER")):
        table = run(short_token_export.directory, source, tmp_path / name, "--ignore-labels", ignore)
        labels = [] if not ignore else ignore.split(",")
        for text, row in zip(texts, table.to_pylist()):
            expected = token_classify_reference.entities(text, max_length=MAX_LENGTH, ignore_labels=labels)
            assert_entities(row["entities"], expected, text)
        found = {e["label"] for entities in table.column("entities").to_pylist() for e in entities}
        assert ("O" in found) == (not ignore)
        assert "PER" not in found or not ignore


def test_a_changed_aggregation_is_a_different_job(tmp_path: Path, short_token_export: ExportResult) -> None:
    source = write_texts(tmp_path / "in.parquet", TEXTS)
    run(short_token_export.directory, source, tmp_path / "out", "--aggregation", "first")
    result = invoke("run", "--model", short_token_export.directory, "--input", source, "--output", tmp_path / "out",
                    "--text-column", "text", "--aggregation", "max")
    assert result.exit_code == ExitCode.OUTPUT_CONFLICT, result.output
    assert "aggregation" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text-pair-column", "passage"], "token classifier"),
        (["--stride", STRIDE, "--aggregation", "none"], "--aggregation none"),
        (["--stride", MAX_LENGTH], "--stride must be between 0 and"),
        (["--threshold", 0.3], "--threshold applies to multi-label classify"),
    ],
)
def test_token_classify_refuses_options_it_cannot_honour(
    tmp_path: Path, short_token_export: ExportResult, extra: list[object], message: str
) -> None:
    source = write_texts(tmp_path / "in.parquet", ["a b"], ["c d"])
    result = invoke("run", "--model", short_token_export.directory, "--input", source, "--output", tmp_path / "out",
                    "--text-column", "text", *extra)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert message in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.parametrize("option", [["--aggregation", "max"], ["--ignore-labels", "O"], ["--stride", 4], ["--threshold", 0.5]])
def test_head_options_are_refused_for_other_models(
    tmp_path: Path, tiny_decisive_classify_export: ExportResult, option: list[object]
) -> None:
    source = write_texts(tmp_path / "in.parquet", ["a b"])
    result = invoke("run", "--model", tiny_decisive_classify_export.directory, "--input", source, "--output", tmp_path / "out",
                    "--text-column", "text", *option)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert " apply to " in result.stderr or " applies to " in result.stderr


# --- classify ------------------------------------------------------------------------------------

QUERIES = ["what is the capital of nepal?"] * 3 + ["is it raining?", None, "zürich or 東京?"]
PASSAGES = [
    "Kathmandu is the capital of Nepal.",
    "The quick brown fox jumps over the lazy dog.",
    "Nepal is a country in South Asia, between India and China.",
    "No.",
    "a passage without a query",
    "",
]


def test_reranking_is_classify_over_pairs(tmp_path: Path, tiny_cross_encoder_checkpoint: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    model = tmp_path / "reranker"
    assert invoke("export", tiny_cross_encoder_checkpoint, "--task", "classify", "--out", model).exit_code == 0
    source = write_texts(tmp_path / "pairs.parquet", QUERIES, PASSAGES)
    table = run(model, source, tmp_path / "out", "--text-pair-column", "passage")

    assert table.column_names == ["id", "passage", "num_tokens", "truncated", "label", "label_id", "score", "probs", "logits", "error"]
    pairs = [(query, passage) for query, passage in zip(QUERIES, PASSAGES) if query is not None]
    cross_encoder = CrossEncoder(str(tiny_cross_encoder_checkpoint), device="cpu")
    rows = [row for row, query in zip(table.to_pylist(), QUERIES) if query is not None]
    np.testing.assert_allclose([row["score"] for row in rows], cross_encoder.predict(pairs), rtol=0, atol=1e-5)
    np.testing.assert_allclose([row["logits"][0] for row in rows], cross_encoder.predict(pairs, activation_fn=torch.nn.Identity()), atol=1e-4)
    assert all(row["probs"] == [row["score"]] and row["label"] == "LABEL_0" and row["label_id"] == 0 for row in rows)
    assert len({round(row["score"], 4) for row in rows}) == len(rows)
    assert table.column("score")[QUERIES.index(None)].as_py() is None


def test_multi_label_rows_list_the_labels_above_the_threshold(tmp_path: Path, tiny_multi_label_checkpoint: Path) -> None:
    model = tmp_path / "tagger"
    assert invoke("export", tiny_multi_label_checkpoint, "--task", "classify", "--out", model).exit_code == 0
    texts: list[str | None] = [text for text in TEXTS if text is not None and len(text) < 100] + [None]
    source = write_texts(tmp_path / "in.parquet", texts)
    names = ["toxic", "insult", "threat", "spam"]
    counts = []
    for threshold in (None, 0.2, 0.9):
        extra = [] if threshold is None else ["--threshold", threshold]
        table = run(model, source, tmp_path / f"out-{threshold}", *extra)
        assert table.column_names[-3:] == ["logits", "labels", "error"]
        for row in table.to_pylist():
            if row["probs"] is None:
                assert row["labels"] is None
                continue
            probs = np.asarray(row["probs"])
            np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.asarray(row["logits"]))), atol=1e-6)
            assert row["labels"] == [name for name, p in zip(names, probs) if p >= (threshold or 0.5)]
            assert row["label"] == names[int(probs.argmax())]
        counts.append(sum(len(labels or []) for labels in table.column("labels").to_pylist()))
    assert counts[1] > counts[0] > counts[2], "the threshold decides which labels a row gets"


def test_a_classify_export_from_before_the_activation_field_still_runs(
    tmp_path: Path, tiny_decisive_classify_export: ExportResult
) -> None:
    """Its manifest has no `activation` and one output (softmax probs): the same columns as before, no `logits`."""
    import shutil
    from dataclasses import replace

    from worker.modeldir.manifest import read_manifest, write_manifest

    model = tmp_path / "old-export"
    shutil.copytree(tiny_decisive_classify_export.directory, model)
    write_manifest(model, replace(read_manifest(model), activation=None, outputs=("probs",)))
    source = write_texts(tmp_path / "in.parquet", ["i love kathmandu", "a b c"])
    table = run(model, source, tmp_path / "out")
    assert table.column_names == ["id", "num_tokens", "truncated", "label", "label_id", "score", "probs", "error"]
    fresh = run(tiny_decisive_classify_export.directory, source, tmp_path / "fresh")
    assert table.column("probs").equals(fresh.column("probs"))


def test_export_activation_on_the_command_line(tmp_path: Path, tiny_decisive_classifier_checkpoint: Path) -> None:
    from worker.modeldir.manifest import read_manifest

    model = tmp_path / "model"
    result = invoke("export", tiny_decisive_classifier_checkpoint, "--task", "classify", "--out", model, "--activation", "none")
    assert result.exit_code == 0, result.output
    assert "classify activation: none (--activation none)" in result.output
    assert read_manifest(model).activation == "none"
    bad = invoke("export", tiny_decisive_classifier_checkpoint, "--task", "classify", "--out", tmp_path / "x", "--activation", "tanh")
    assert bad.exit_code == 2
