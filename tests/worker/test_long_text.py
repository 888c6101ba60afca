"""`bertbatch run` on long texts and embedding outputs, against sentence-transformers on the packaged MiniLM.

Prompts against ``encode(prompt=...)``, ``--dimensions`` against ``truncate_dim`` then
normalisation, ``--embedding-dtype`` against ``quantize_embeddings``, and chunking against
a reference built here: chunks cut by hand from the tokenizer's ids, embedded by the
sentence-transformers model's own transformer, averaged as the issue specifies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from conftest import minilm_dir
from exporter.export import ExportResult
from worker.cli import app
from worker.exit_codes import ExitCode
from worker.jobstate import JOB_FILE
from worker.quantization import RANGES_METADATA_KEY, dequantize

WORDS = "river stone house light garden window music morning story table paper city".split()
MAX_LENGTH = 16  # chunks of 14 content tokens (16 less [CLS] and [SEP]): cheap to check by hand
CONTENT = MAX_LENGTH - 2


def text_of_tokens(count: int, seed: int = 0) -> str:
    """A text of exactly ``count`` content tokens (each word is one token of the MiniLM vocabulary)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=count))


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def run(model: Path, source: Path, output: Path, *extra: object) -> Result:
    result = invoke("run", "--model", model, "--input", source, "--output", output, "--text-column", "text", "--device", "cpu", *extra)
    return result


def write_texts(path: Path, texts: list[str | None], row_group_size: int | None = None) -> Path:
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)  # shards follow row groups
    return path


def vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return np.array(table.column(column).to_pylist(), dtype=np.float64)


@pytest.fixture(scope="module")
def st_model() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


SENTENCES = [
    "i love kathmandu",
    "The river ran past old stone houses in the morning light.",
    "",
    "Ünïcode tëxt, with accents and punctuation!",
]


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("sentences") / "in.parquet", list(SENTENCES))


@pytest.fixture(scope="module")
def float_output(tmp_path_factory: pytest.TempPathFactory, minilm_export: ExportResult, sentences: Path) -> pa.Table:
    output = tmp_path_factory.mktemp("float") / "out"
    result = run(minilm_export.directory, sentences, output)
    assert result.exit_code == 0, result.output
    return pq.read_table(output)


def test_prompt_is_prepended_as_sentence_transformers_does(tmp_path: Path, minilm_export: ExportResult, sentences: Path, st_model: Any) -> None:
    result = run(minilm_export.directory, sentences, tmp_path / "out", "--prompt", "query: ")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    expected = st_model.encode(SENTENCES, prompt="query: ")
    np.testing.assert_allclose(vectors(table), expected, atol=2e-5)
    unprompted = st_model.encode(SENTENCES)
    assert np.abs(vectors(table) - unprompted).max() > 1e-2  # the prompt changed the numbers
    counts = [len(st_model.tokenizer("query: " + text)["input_ids"]) for text in SENTENCES]
    assert table.column("num_tokens").to_pylist() == counts


def test_dimensions_are_truncate_dim_then_normalisation(tmp_path: Path, minilm_export: ExportResult, sentences: Path, st_model: Any, float_output: pa.Table) -> None:
    result = run(minilm_export.directory, sentences, tmp_path / "out", "--dimensions", 128)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    expected = st_model.encode(SENTENCES, truncate_dim=128, normalize_embeddings=True)
    np.testing.assert_allclose(vectors(table), expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors(table), axis=1), 1.0, atol=1e-6)


def test_dimensions_beyond_the_model_are_a_usage_error(tmp_path: Path, minilm_export: ExportResult, sentences: Path) -> None:
    result = run(minilm_export.directory, sentences, tmp_path / "out", "--dimensions", 385)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "--dimensions must be between 1 and the model's 384" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("precision", ["binary", "ubinary", "float16"])
def test_packed_bits_and_half_floats_equal_quantize_embeddings(
    tmp_path: Path, minilm_export: ExportResult, sentences: Path, float_output: pa.Table, precision: str
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    result = run(minilm_export.directory, sentences, tmp_path / "out", "--embedding-dtype", precision)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    floats = vectors(float_output).astype(np.float32)
    got = np.array(table.column("embedding").to_pylist())
    if precision == "float16":
        assert table.schema.field("embedding").type == pa.list_(pa.float16(), 384)
        assert np.array_equal(got.astype(np.float16), floats.astype(np.float16))
        return
    expected = quantize_embeddings(floats, precision=precision)
    assert table.schema.field("embedding").type == pa.list_(pa.int8() if precision == "binary" else pa.uint8(), 48)
    assert got.astype(expected.dtype).tobytes() == expected.tobytes()


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_scalar_quantization_with_a_calibration_file(
    tmp_path: Path, minilm_export: ExportResult, sentences: Path, float_output: pa.Table, precision: str
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    calibration_vectors = np.random.default_rng(0).standard_normal((50, 384)).astype(np.float32) * 0.05
    calibration = tmp_path / "calibration.parquet"
    pq.write_table(pa.table({"embedding": pa.array(calibration_vectors.tolist(), pa.list_(pa.float32()))}), calibration)
    result = run(minilm_export.directory, sentences, tmp_path / "out", "--embedding-dtype", precision, "--calibration", calibration)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    floats = vectors(float_output).astype(np.float32)
    expected = quantize_embeddings(floats, precision=precision, calibration_embeddings=calibration_vectors)
    got = np.array(table.column("embedding").to_pylist()).astype(expected.dtype)
    assert np.array_equal(got, expected)


def test_int8_ranges_from_the_first_rows_are_in_the_job_file_and_every_shard(
    tmp_path: Path, minilm_export: ExportResult, st_model: Any
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    texts = [text_of_tokens(3 + i % 20, seed=i) for i in range(40)]
    source = write_texts(tmp_path / "in.parquet", list(texts), row_group_size=10)
    output = tmp_path / "out"
    result = run(minilm_export.directory, source, output, "--embedding-dtype", "int8", "--calibration-rows", 25, "--rows-per-shard", 10)
    assert result.exit_code == 0, result.output
    floats = st_model.encode(texts)
    shards = sorted(output.glob("part-*.parquet"))
    assert len(shards) == 4
    stored = json.loads((output / JOB_FILE).read_text())["embedding_ranges"]
    for shard in shards:
        record = json.loads(pq.read_schema(shard).metadata[RANGES_METADATA_KEY])
        assert record["dtype"] == "int8" and record["dimensions"] == 384 and record["ranges"] == stored
    ranges = np.array(stored, dtype=np.float32)
    # The ranges of the first 25 rows' embeddings (ONNX vs PyTorch: float error only).
    np.testing.assert_allclose(ranges, np.vstack((floats[:25].min(axis=0), floats[:25].max(axis=0))), atol=2e-5)
    got = np.array(pq.read_table(output).column("embedding").to_pylist())
    # PyTorch's floats: a value on a bucket edge may fall either side of the float error.
    assert np.abs(got - quantize_embeddings(floats, precision="int8", ranges=ranges).astype(np.int64)).max() <= 1
    # The same job's own float32 output: exactly quantize_embeddings with the stored ranges.
    assert run(minilm_export.directory, source, tmp_path / "float", "--rows-per-shard", 10).exit_code == 0
    own = vectors(pq.read_table(tmp_path / "float")).astype(np.float32)
    assert np.array_equal(got, quantize_embeddings(own, precision="int8", ranges=ranges))
    # The README's recipe: dequantize with the shard's own ranges.
    restored = dequantize(got, "int8", np.array(json.loads(pq.read_schema(shards[0]).metadata[RANGES_METADATA_KEY])["ranges"]))
    step = (ranges[1] - ranges[0]) / 255
    inside = (floats >= ranges[0]) & (floats <= ranges[1])
    assert np.all(np.abs(restored - floats)[inside] <= np.broadcast_to(step, floats.shape)[inside] * 2 + 1e-6)


def test_output_options_are_part_of_the_job_identity(tmp_path: Path, minilm_export: ExportResult, sentences: Path) -> None:
    output = tmp_path / "out"
    assert run(minilm_export.directory, sentences, output).exit_code == 0
    for extra in (["--embedding-dtype", "binary"], ["--dimensions", 64], ["--prompt", "query: "], ["--chunking", "mean"]):
        changed = run(minilm_export.directory, sentences, output, *extra)
        assert changed.exit_code == ExitCode.OUTPUT_CONFLICT, (extra, changed.output)
    replaced = run(minilm_export.directory, sentences, output, "--dimensions", 64, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert pq.read_table(output).schema.field("embedding").type == pa.list_(pa.float32(), 64)


# Chunking ------------------------------------------------------------------------------------------


def reference_chunks(st_model: Any, text: str, overlap: int, prompt: str = "") -> list[tuple[list[int], int, int, int]]:
    """(token ids, content tokens, chunk_start, chunk_end) per chunk, cut by hand from the tokenizer's ids."""
    tokenizer = st_model.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    encoded = tokenizer(prompt + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][len(prompt_ids):], encoded["offset_mapping"][len(prompt_ids):]
    room = MAX_LENGTH - 2 - len(prompt_ids)
    chunks = []
    first = 0
    while True:
        last = min(first + room, len(ids))
        framed = [tokenizer.cls_token_id, *prompt_ids, *ids[first:last], tokenizer.sep_token_id]
        start, end = (offsets[first][0] - len(prompt), offsets[last - 1][1] - len(prompt)) if last > first else (0, 0)
        chunks.append((framed, last - first, max(start, 0), max(end, 0)))
        if last >= len(ids):
            return chunks
        first = last - overlap


def embed_chunks(st_model: Any, chunks: list[tuple[list[int], int, int, int]]) -> np.ndarray:
    """The transformer of the sentence-transformers model, mean pooling, normalisation: per chunk."""
    import torch

    transformer = st_model[0].auto_model
    out = []
    for length in sorted({len(ids) for ids, *_ in chunks}):
        same = [i for i, (ids, *_) in enumerate(chunks) if len(ids) == length]
        with torch.no_grad():
            hidden = transformer(input_ids=torch.tensor([chunks[i][0] for i in same])).last_hidden_state
        out += list(zip(same, torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1).numpy()))
    return np.array([vector for _, vector in sorted(out, key=lambda item: item[0])], dtype=np.float64)


EDGE_TEXTS = {
    "one token": text_of_tokens(1, seed=1),
    "exactly the maximum": text_of_tokens(CONTENT, seed=2),
    "one over": text_of_tokens(CONTENT + 1, seed=3),
    "thousands": text_of_tokens(1200, seed=4),
    "empty": "",
    "unicode": "Ünïcode tëxt, with accents and punctuation! " * 6,
}


@pytest.fixture(scope="module")
def edge_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("edge") / "in.parquet", [*EDGE_TEXTS.values(), None])


@pytest.mark.parametrize(("overlap", "prompt"), [(0, ""), (CONTENT - 1, ""), (3, "query: ")])
def test_chunking_mean_equals_the_hand_built_reference(
    tmp_path: Path, minilm_export: ExportResult, edge_rows: Path, st_model: Any, overlap: int, prompt: str
) -> None:
    if prompt and overlap >= CONTENT - 2:
        pytest.skip("the prompt's tokens shrink the chunk")
    extra: list[object] = ["--prompt", prompt] if prompt else []
    output = tmp_path / "out"
    result = run(minilm_export.directory, edge_rows, output, "--max-length", MAX_LENGTH, "--chunking", "mean", "--chunk-overlap", overlap, *extra)
    assert result.exit_code == 0, result.output
    table = pq.read_table(output)
    assert table.num_rows == len(EDGE_TEXTS) + 1
    got = vectors(table.slice(0, len(EDGE_TEXTS)))
    for index, (name, text) in enumerate(EDGE_TEXTS.items()):
        chunks = reference_chunks(st_model, text, overlap, prompt)
        embedded = embed_chunks(st_model, chunks)
        weights = np.array([content for _, content, _, _ in chunks], dtype=np.float64)
        if len(chunks) == 1:
            expected = embedded[0]
        else:
            mean = (embedded * weights[:, None]).sum(axis=0) / weights.sum()
            expected = mean / np.linalg.norm(mean)
        np.testing.assert_allclose(got[index], expected, atol=2e-5, err_msg=name)
        assert table.column("num_tokens")[index].as_py() == sum(len(ids) for ids, *_ in chunks), name
        assert table.column("truncated")[index].as_py() is False
    if overlap == CONTENT - 1:  # a step of one token: every window of the long text is a chunk
        assert len(reference_chunks(st_model, EDGE_TEXTS["thousands"], overlap)) == 1200 - CONTENT + 1
    last = table.slice(len(EDGE_TEXTS)).to_pylist()[0]
    assert last["embedding"] is None and last["num_tokens"] is None and "null text" in last["error"]


def test_a_row_that_fits_gets_what_it_gets_without_chunking(
    tmp_path: Path, minilm_export: ExportResult, edge_rows: Path
) -> None:
    common = ("--max-length", MAX_LENGTH)
    assert run(minilm_export.directory, edge_rows, tmp_path / "off", *common).exit_code == 0
    assert run(minilm_export.directory, edge_rows, tmp_path / "mean", *common, "--chunking", "mean", "--chunk-overlap", 2).exit_code == 0
    off, mean = (pq.read_table(tmp_path / name) for name in ("off", "mean"))
    present = len(EDGE_TEXTS)  # the last row is null
    for index, name in enumerate(EDGE_TEXTS):
        if name in ("one token", "exactly the maximum", "empty"):
            np.testing.assert_allclose(vectors(mean.slice(0, present))[index], vectors(off.slice(0, present))[index], atol=1e-6, err_msg=name)
            assert mean.column("num_tokens")[index] == off.column("num_tokens")[index]
    truncated = off.column("truncated").to_pylist()
    assert truncated == [False, False, True, True, False, True, None]


@pytest.mark.parametrize("overlap", [0, CONTENT - 1])
def test_chunking_rows_writes_each_chunk_with_its_offsets(
    tmp_path: Path, minilm_export: ExportResult, edge_rows: Path, st_model: Any, overlap: int
) -> None:
    output = tmp_path / "out"
    result = run(minilm_export.directory, edge_rows, output, "--max-length", MAX_LENGTH, "--chunking", "rows", "--chunk-overlap", overlap, "--keep-text")
    assert result.exit_code == 0, result.output
    table = pq.read_table(output)
    assert table.column_names == ["id", "text", "chunk", "chunk_start", "chunk_end", "num_tokens", "truncated", "embedding", "error"]
    for field in ("chunk", "chunk_start", "chunk_end", "num_tokens"):
        assert table.schema.field(field).type == pa.int32()
    rows = table.to_pylist()
    expected_rows = []
    for index, text in enumerate(EDGE_TEXTS.values()):
        chunks = reference_chunks(st_model, text, overlap)
        embedded = embed_chunks(st_model, chunks)
        for position, ((ids, _, start, end), vector) in enumerate(zip(chunks, embedded)):
            expected_rows.append((index, text, position, start, end, len(ids), vector))
    assert len(rows) == len(expected_rows) + 1  # the null row: one row of nulls
    for row, (index, text, position, start, end, tokens, vector) in zip(rows, expected_rows):
        assert (row["id"], row["text"], row["chunk"], row["chunk_start"], row["chunk_end"]) == (index, text, position, start, end)
        assert row["num_tokens"] == tokens and row["truncated"] is False and row["error"] is None
        np.testing.assert_allclose(row["embedding"], vector, atol=2e-5)
    null_row = rows[-1]
    assert null_row["id"] == len(EDGE_TEXTS) and null_row["chunk"] is None and null_row["embedding"] is None
    assert "null text" in null_row["error"]
    # The offsets point into the text: a chunk's span starts and ends on its tokens.
    unicode = [row for row in rows if row["id"] == list(EDGE_TEXTS).index("unicode")]
    assert unicode[0]["text"][unicode[0]["chunk_start"] : unicode[0]["chunk_end"]].startswith("Ünïcode")
    assert unicode[-1]["chunk_end"] == len(EDGE_TEXTS["unicode"].rstrip())


def test_long_texts_are_batched_within_the_token_budget(tmp_path: Path, minilm_export: ExportResult, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.batching import PaddedBatch
    from worker.runner import Runner

    seen: list[tuple[int, int]] = []
    original = Runner.run

    def recording(self: Runner, batch: PaddedBatch) -> dict[str, np.ndarray]:
        seen.append(batch.input_ids.shape)
        return original(self, batch)

    monkeypatch.setattr(Runner, "run", recording)
    source = write_texts(tmp_path / "in.parquet", [text_of_tokens(3000, seed=9), "short"])
    result = run(minilm_export.directory, source, tmp_path / "out", "--chunking", "mean", "--max-tokens", 2048)
    assert result.exit_code == 0, result.output
    assert len(seen) > 1 and all(rows * width <= 2048 for rows, width in seen)
    assert max(width for _, width in seen) <= minilm_export.manifest.max_length


def test_chunking_usage_errors(tmp_path: Path, minilm_export: ExportResult, sentences: Path, tiny_classify_export: ExportResult) -> None:
    too_much = run(minilm_export.directory, sentences, tmp_path / "a", "--max-length", MAX_LENGTH, "--chunking", "rows", "--chunk-overlap", CONTENT)
    assert too_much.exit_code == ExitCode.USAGE_ERROR and "must be smaller than the chunk (14 tokens)" in too_much.stderr
    classify = run(tiny_classify_export.directory, sentences, tmp_path / "b", "--chunking", "mean")
    assert classify.exit_code == ExitCode.USAGE_ERROR and "--chunking applies to embed models" in classify.stderr
    both = run(minilm_export.directory, sentences, tmp_path / "c", "--prompt", "a", "--prompt-name", "query")
    assert both.exit_code == ExitCode.USAGE_ERROR
    unknown = run(minilm_export.directory, sentences, tmp_path / "d", "--prompt-name", "query")
    assert unknown.exit_code == ExitCode.USAGE_ERROR and "the model's prompts are none" in unknown.stderr


# Prompts from the sentence-transformers config, include_prompt false ------------------------------

PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def prompted_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged MiniLM with prompts, a default prompt and Pooling(include_prompt=False), as e5/bge-style models ship."""
    import shutil

    directory = tmp_path_factory.mktemp("prompted") / "minilm"
    shutil.copytree(minilm_dir(), directory)
    config = json.loads((directory / "config_sentence_transformers.json").read_text())
    (directory / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": PROMPTS, "default_prompt_name": "query"}))
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": False}))
    return directory


@pytest.fixture(scope="module")
def prompted_export(tmp_path_factory: pytest.TempPathFactory, prompted_model_dir: Path) -> ExportResult:
    from exporter.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("prompted-export") / "model"
    return export_model(ExportConfig(source=str(prompted_model_dir), task="embed", out=out), log=lambda line: None)


def test_prompts_and_include_prompt_are_exported(prompted_export: ExportResult) -> None:
    manifest = prompted_export.manifest
    assert (manifest.prompts, manifest.default_prompt_name, manifest.include_prompt) == (PROMPTS, "query", False)
    assert manifest.inputs[-1] == "pooling_mask" and manifest.validated


@pytest.mark.parametrize("name", ["query", "passage", None])
def test_prompt_name_and_the_default_prompt_pool_as_sentence_transformers(
    tmp_path: Path, prompted_export: ExportResult, prompted_model_dir: Path, sentences: Path, name: str | None
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(prompted_model_dir), device="cpu")
    assert reference.default_prompt_name == "query" and not reference[1].include_prompt
    extra: list[object] = ["--prompt-name", name] if name else []
    result = run(prompted_export.directory, sentences, tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    got = vectors(pq.read_table(tmp_path / "out"))
    expected = reference.encode(SENTENCES, prompt_name=name)  # None: the default prompt, as sentence-transformers does
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # The prompt's tokens are really left out: pooling them in gives other numbers.
    reference[1].include_prompt = True
    assert np.abs(got - reference.encode(SENTENCES, prompt_name=name)).max() > 1e-3


def test_include_prompt_false_with_chunking_leaves_the_prompt_out_of_every_chunk(
    tmp_path: Path, prompted_export: ExportResult, prompted_model_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(prompted_model_dir), device="cpu")
    reference.max_seq_length = MAX_LENGTH
    texts = [text_of_tokens(10, seed=5), text_of_tokens(40, seed=6)]
    source = write_texts(tmp_path / "in.parquet", list(texts))
    result = run(prompted_export.directory, source, tmp_path / "out", "--max-length", MAX_LENGTH, "--chunking", "rows", "--chunk-overlap", 0)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    rows = table.to_pylist()
    # Each chunk as a text of its own (its words: one token each), prompted and pooled by sentence-transformers.
    chunk_texts = [texts[row["id"]][row["chunk_start"] : row["chunk_end"]] for row in rows]
    np.testing.assert_allclose(vectors(table), reference.encode(chunk_texts), atol=2e-5)


def test_a_fused_int8_export_keeps_the_pooling_mask(tmp_path: Path, prompted_model_dir: Path, sentences: Path) -> None:
    """--quantize int8 (a fused graph) with include_prompt false: the pooling_mask input survives optimizing, validates, runs."""
    from sentence_transformers import SentenceTransformer

    from exporter.export import ExportConfig, export_model

    export = export_model(ExportConfig(source=str(prompted_model_dir), task="embed", out=tmp_path / "int8", quantize="int8"), log=lambda line: None)
    assert export.manifest.inputs[-1] == "pooling_mask" and export.manifest.optimized and export.manifest.validated
    result = run(export.directory, sentences, tmp_path / "out", "--prompt-name", "passage")
    assert result.exit_code == 0, result.output
    got = vectors(pq.read_table(tmp_path / "out"))
    expected = SentenceTransformer(str(prompted_model_dir), device="cpu").encode(SENTENCES, prompt_name="passage")
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() > 0.97  # int8 error only; the fp32 tests above check that the prompt is left out
