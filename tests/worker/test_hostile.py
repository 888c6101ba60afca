"""Hostile input: whatever junk the rows hold, the job finishes, keeps every row in order,
and says which rows it could not embed; whatever is wrong with a file stops the job
before it writes anything, naming the file.

Property tests generate Parquet datasets: unicode of every plane (control and format
characters, unassigned and private-use code points), nulls, empty and huge strings,
all-null text columns, zero-row files and row groups, and files whose other columns
differ. Each example runs the tiny embedding model, so examples are few.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from exporter.export import ExportResult
from worker.batching import PaddedBatch
from worker.cli import app
from worker.config import RunConfig
from worker.exit_codes import ExitCode
from worker.job import run_job
from worker.modeldir.padding import pad_rows
from worker.runner import Runner, open_model_dir
from worker.tokenize import load_tokenizer, tokenize_window

HUGE = 200_000  # characters
NO_SURROGATES: list[Literal["Cs"]] = ["Cs"]  # Arrow strings are UTF-8, which cannot hold them

TEXTS = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.characters(exclude_categories=NO_SURROGATES), max_size=30),  # any code point but surrogates
    st.text(st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\xa0\u200b\u200e\u202e\u2028\ufeff\ufffd\uffff"), max_size=12),
    st.text(st.characters(min_codepoint=0xE000, exclude_categories=NO_SURROGATES), max_size=12),  # private use, astral, unassigned
    st.lists(st.sampled_from(["river", "stone", "[MASK]", "[SEP]", "[CLS]", "##ing", " ", "\t", "\n", "é", "ß", "北京", "🙂"]), max_size=20).map("".join),
)
TEXT_TYPES = ["string", "large_string", "dictionary"]
EXTRA_COLUMNS = [None, "int", "string", "struct"]


@dataclass(frozen=True)
class FileSpec:
    row_groups: list[list[str | None]]
    text_type: str  # "null" only for files without a non-null text
    extra: str | None  # a passthrough column whose type differs from file to file
    no_row_groups: bool  # a writer opened and closed: a file with no row group at all
    huge: tuple[int, str] | None = None  # (row, piece): that row's text is the piece repeated to HUGE characters

    def texts(self) -> list[str | None]:
        texts = [text for group in self.row_groups for text in group]
        if self.huge is not None:
            row, piece = self.huge
            texts[row] = (piece * (HUGE // len(piece) + 1))[:HUGE]
        return texts


@st.composite
def file_specs(draw: st.DrawFn) -> FileSpec:
    row_groups = draw(st.lists(st.lists(TEXTS, max_size=10), max_size=4))
    texts = [text for group in row_groups for text in group]
    types = TEXT_TYPES + (["null"] if all(text is None for text in texts) else [])
    return FileSpec(row_groups, draw(st.sampled_from(types)), draw(st.sampled_from(EXTRA_COLUMNS)), not texts and draw(st.booleans()))


@st.composite
def datasets(draw: st.DrawFn) -> list[FileSpec]:
    files = draw(st.lists(file_specs(), min_size=1, max_size=4))
    candidates = [(f, row) for f, spec in enumerate(files) for row in range(sum(map(len, spec.row_groups))) if spec.text_type != "null"]
    if candidates and draw(st.integers(0, 3)) == 0:  # now and then one huge row, made of a drawn piece
        f, row = draw(st.sampled_from(candidates))
        piece = draw(st.text(st.characters(exclude_categories=NO_SURROGATES), min_size=1, max_size=8)) + " "
        files[f] = replace(files[f], huge=(row, piece))
    return files


def text_array(texts: list[str | None], text_type: str) -> pa.Array:
    if text_type == "null":
        return pa.nulls(len(texts))
    if text_type == "dictionary":
        return pa.array(texts, pa.string()).dictionary_encode()
    return pa.array(texts, pa.string() if text_type == "string" else pa.large_string())


def extra_array(kind: str | None, ids: list[int]) -> pa.Array | None:
    if kind == "int":
        return pa.array([i * 3 for i in ids], pa.int32())
    if kind == "string":
        return pa.array([f"extra {i}" if i % 2 else None for i in ids], pa.string())
    if kind == "struct":
        return pa.array([{"a": i, "b": [float(i)] * (i % 3)} for i in ids])
    return None


def write_dataset(directory: Path, files: list[FileSpec]) -> list[pa.Table]:
    """One Parquet file per spec, row groups as drawn (empty ones included); returns what was written."""
    tables = []
    first_id = 0
    for index, spec in enumerate(files):
        texts = spec.texts()
        ids = list(range(first_id, first_id + len(texts)))
        first_id += len(texts)
        columns = {"id": pa.array(ids, pa.int64()), "text": text_array(texts, spec.text_type)}
        extra = extra_array(spec.extra, ids)
        if extra is not None:
            columns[f"extra_{spec.extra}"] = extra
        table = pa.table(columns)
        with pq.ParquetWriter(directory / f"file-{index:02d}.parquet", table.schema) as writer:
            offset = 0
            for group in [] if spec.no_row_groups else spec.row_groups:
                writer.write_table(table.slice(offset, len(group)))  # a zero-length slice is a zero-row group
                offset += len(group)
        tables.append(table)
    return tables


class SingleRowReference:
    """Each distinct text embedded alone (a batch of one, no padding): what its row must hold,
    wherever batching put it."""

    def __init__(self, export: ExportResult) -> None:
        model_dir = open_model_dir(export.directory)
        self.runner = Runner(model_dir, "cpu")
        self.tokenizer = load_tokenizer(model_dir.tokenizer_file, model_dir.manifest.max_length)
        self.pad = model_dir.manifest.special_tokens.pad
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, text: str) -> np.ndarray:
        if text not in self.cache:
            tokens = tokenize_window(self.tokenizer, [text])
            batch = PaddedBatch(np.arange(1), *pad_rows(tokens.token_ids, tokens.type_ids, self.pad))
            self.cache[text] = self.runner.run(batch)["embedding"][0]
        return self.cache[text]


@pytest.fixture(scope="module")
def single_row(tiny_embed_export: ExportResult) -> SingleRowReference:
    return SingleRowReference(tiny_embed_export)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=datasets(), keep_text=st.booleans(), batch_size=st.sampled_from([1, 3, 64]))
def test_junk_rows_never_stop_the_job_and_every_row_comes_out_in_order(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_embed_export: ExportResult,
    single_row: SingleRowReference,
    files: list[FileSpec],
    keep_text: bool,
    batch_size: int,
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as scratch:
        inputs, output = Path(scratch) / "inputs", Path(scratch) / "out"
        inputs.mkdir()
        tables = write_dataset(inputs, files)
        config = RunConfig(
            model_dir=tiny_embed_export.directory, input=str(inputs), output=output, text_column="text", id_column="id",
            batch_size=batch_size, max_tokens=512, rows_per_shard=7, read_batch_rows=5, keep_text=keep_text,
        )  # fmt: skip
        summary = run_job(config)
        rows = sum(table.num_rows for table in tables)
        texts = [text for table in tables for text in table.column("text").to_pylist()]
        assert summary.rows == rows
        assert summary.error_rows == texts.count(None)

        for index, table in enumerate(tables):
            shards = sorted(output.glob(f"part-{index:05d}-*.parquet"))
            if table.num_rows == 0:
                assert not shards  # nothing to write for a file without rows
                continue
            got = pa.concat_tables(pq.read_table(path) for path in shards)
            assert got.column("id").equals(table.column("id")), "rows lost, duplicated or reordered"
            for name in table.column_names:  # passthrough columns, of this file's own types
                if name != "text" or keep_text:
                    assert got.column(name).equals(table.column(name)), name
            if not keep_text:
                assert "text" not in got.column_names
        if rows:
            results = ["id", "embedding", "error"]  # files differ in their other columns
            out = pa.concat_tables(pq.read_table(path, columns=results) for path in sorted(output.glob("part-*.parquet")))
            assert out.column("id").to_pylist() == list(range(rows))
            for text, vector, note in zip(texts, out.column("embedding").to_pylist(), out.column("error").to_pylist()):
                if text is None:
                    assert vector is None and note == "null text in column 'text'"
                    continue
                assert note is None
                assert vector is not None and len(vector) == tiny_embed_export.manifest.embedding_dim
                assert all(math.isfinite(value) for value in vector)
                np.testing.assert_allclose(vector, single_row.embed(text), rtol=0, atol=1e-5)

        assert run_job(config).already_complete  # and a rerun finds nothing to do


def write_texts(path: Path, texts: list[str | None], row_group_size: int = 10) -> Path:
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")
    return path


def run_cli(model: Path, inputs: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        ["run", "--model", str(model), "--input", str(inputs), "--output", str(output), "--text-column", "text",
         "--device", "cpu", "--rows-per-shard", "10", "--no-progress", *extra],
    )  # fmt: skip
    return result.exit_code, result.stderr


def test_text_that_is_not_utf8_makes_an_error_row_not_a_crash(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    # Parquet writers need not check UTF-8: build such a column from raw buffers.
    values = [b"fine text", b"\xff\xfe broken", b"", b"caf\xc3", "ünïcödé".encode()]
    offsets = np.cumsum([0] + [len(value) for value in values], dtype=np.int32)
    broken = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])
    inputs = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(range(5), pa.int64()), "text": broken}), inputs)
    code, stderr = run_cli(tiny_embed_export.directory, inputs, tmp_path / "out")
    assert code == 0, stderr
    out = pq.read_table(tmp_path / "out")
    assert out.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert out.column("error").to_pylist() == [None, "invalid UTF-8 in column 'text'", None, "invalid UTF-8 in column 'text'", None]
    assert [vector is None for vector in out.column("embedding").to_pylist()] == [False, True, False, True, False]


def test_a_non_string_text_column_fails_before_any_output_naming_file_and_column(
    tmp_path: Path, tiny_embed_export: ExportResult
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_texts(inputs / "a.parquet", ["good", "rows"])
    pq.write_table(pa.table({"id": [1], "text": pa.array([b"bytes"], pa.binary())}), inputs / "b.parquet")
    code, stderr = run_cli(tiny_embed_export.directory, inputs, tmp_path / "out")
    assert code == ExitCode.INPUT_ERROR == 3
    assert stderr.strip() == (
        f"error: {inputs / 'b.parquet'}: column 'text' (--text-column) has type binary, expected a string column"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_file_fails_with_exit_3_before_any_output(tmp_path: Path, tiny_embed_export: ExportResult, damage: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_texts(inputs / "a.parquet", [f"row {i}" for i in range(30)])
    broken = write_texts(inputs / "b.parquet", [f"row {i}" for i in range(30)])
    content = broken.read_bytes()
    broken.write_bytes({"truncated": content[: len(content) * 2 // 3], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    code, stderr = run_cli(tiny_embed_export.directory, inputs, tmp_path / "out")
    assert code == ExitCode.INPUT_ERROR
    assert stderr.startswith(f"error: {broken}: cannot read as Parquet: ")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_data_page_fails_with_exit_3_naming_the_file_and_keeps_whole_shards(
    tmp_path: Path, tiny_embed_export: ExportResult
) -> None:
    """Page damage is only seen when the page is read: finished shards stay, nothing partial does."""
    path = write_texts(tmp_path / "in.parquet", [f"row number {i} of the damaged file" for i in range(60)])
    column = pq.ParquetFile(path).metadata.row_group(3).column(1)  # the text column of row group 3
    content = bytearray(path.read_bytes())
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    middle = start + column.total_compressed_size // 2
    content[middle : middle + 8] = bytes(b ^ 0xA5 for b in content[middle : middle + 8])
    path.write_bytes(bytes(content))
    output = tmp_path / "out"
    code, stderr = run_cli(tiny_embed_export.directory, path, output)
    assert code == ExitCode.INPUT_ERROR, stderr
    started, error = stderr.strip().splitlines()  # pyarrow's message spans lines; the CLI prints one
    assert started.startswith("bertbatch: running on ")
    assert error.startswith(f"error: {path}: read failed in row groups (3,): ")
    assert sorted(p.name for p in output.glob("part-*")) == [f"part-00000-0000{i}.parquet" for i in range(3)]
    assert all(pq.read_table(p).num_rows == 10 for p in output.glob("part-*"))
    assert not list(output.glob(".*.tmp-*"))
