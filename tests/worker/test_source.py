"""Resolving inputs, checking schemas up front, and cutting files into shards of whole row groups."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.errors import InputError, InputSchemaError
from worker.source import InputFile, Shard, inspect_inputs, plan_shards, read_shard, resolve_inputs


def write_texts(path: Path, texts: Sequence[str | None], row_group_size: int | None = None, **columns: pa.Array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string()), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """b.parquet, a.parquet, nested/c.parquet, plus files a directory listing must skip."""
    write_texts(tmp_path / "b.parquet", ["b"])
    write_texts(tmp_path / "a.parquet", ["a"])
    write_texts(tmp_path / "nested" / "c.parquet", ["c"])
    write_texts(tmp_path / ".hidden.parquet", ["hidden"])
    write_texts(tmp_path / "_metadata.parquet", ["underscore"])
    (tmp_path / "notes.txt").write_text("not parquet")
    return tmp_path


def test_a_file_resolves_to_itself(tree: Path) -> None:
    assert resolve_inputs(str(tree / "b.parquet")) == [tree / "b.parquet"]


def test_a_directory_resolves_to_its_parquet_files_recursively_sorted(tree: Path) -> None:
    assert resolve_inputs(str(tree)) == [tree / "a.parquet", tree / "b.parquet", tree / "nested" / "c.parquet"]


def test_a_glob_resolves_to_matching_files_sorted(tree: Path) -> None:
    assert resolve_inputs(str(tree / "[ba].parquet")) == [tree / "a.parquet", tree / "b.parquet"]
    assert resolve_inputs(str(tree / "**" / "c.parquet")) == [tree / "nested" / "c.parquet"]
    assert resolve_inputs(str(tree / "**" / "*.parquet"))[-3:] == [tree / "a.parquet", tree / "b.parquet", tree / "nested" / "c.parquet"]


def test_a_glob_that_matches_nothing_is_an_input_error(tree: Path) -> None:
    with pytest.raises(InputError, match="no file matches"):
        resolve_inputs(str(tree / "*.csv.parquet"))


def test_a_missing_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs(str(tmp_path / "absent.parquet"))


def test_a_directory_without_parquet_files_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no \\*.parquet files"):
        resolve_inputs(str(tmp_path))


def test_inspect_reads_row_counts_row_groups_and_columns(tmp_path: Path) -> None:
    path = write_texts(tmp_path / "x.parquet", [f"t{i}" for i in range(10)], row_group_size=4)
    [found] = inspect_inputs([path], "text", None, "id")
    assert found.path == path
    assert found.num_rows == 10
    assert found.row_group_rows == (4, 4, 2)
    assert found.columns == ("id", "text")
    assert found.size == path.stat().st_size
    assert found.mtime_ns == path.stat().st_mtime_ns


@pytest.mark.parametrize(
    ("text_column", "pair_column", "id_column", "missing", "option"),
    [
        ("body", None, None, "body", "--text-column"),
        ("text", "second", None, "second", "--text-pair-column"),
        ("text", None, "key", "key", "--id-column"),
    ],
)
def test_a_missing_column_names_the_file_and_the_column(
    tmp_path: Path, text_column: str, pair_column: str | None, id_column: str | None, missing: str, option: str
) -> None:
    good = write_texts(tmp_path / "a.parquet", ["x"], body=pa.array(["y"]), second=pa.array(["z"]), key=pa.array([1]))
    bad = write_texts(tmp_path / "b.parquet", ["x"])
    with pytest.raises(InputSchemaError) as raised:
        inspect_inputs([good, bad], text_column, pair_column, id_column)
    message = str(raised.value)
    assert str(bad) in message and repr(missing) in message and option in message
    assert str(good) not in message
    assert "\n" not in message


def test_a_non_string_text_column_is_refused(tmp_path: Path) -> None:
    path = write_texts(tmp_path / "x.parquet", ["a"], number=pa.array([3]))
    with pytest.raises(InputSchemaError, match="'number'.*int64.*string"):
        inspect_inputs([path], "number", None, None)
    with pytest.raises(InputSchemaError, match="'number'.*--text-pair-column"):
        inspect_inputs([path], "text", "number", None)


def test_large_string_text_and_any_id_type_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": pa.array([1.5]), "text": pa.array(["a"], pa.large_string())}), path)
    [found] = inspect_inputs([path], "text", None, "key")
    assert found.num_rows == 1


def test_a_corrupt_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    good = write_texts(tmp_path / "a.parquet", ["x"])
    corrupt = tmp_path / "x.parquet"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(InputError) as raised:
        inspect_inputs([good, corrupt], "text", None, None)
    assert str(corrupt) in str(raised.value)
    assert "cannot read as Parquet" in str(raised.value)


def test_an_empty_file_is_an_input_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    empty.touch()
    with pytest.raises(InputError, match="empty.parquet"):
        inspect_inputs([empty], "text", None, None)


def input_file(row_group_rows: tuple[int, ...]) -> InputFile:
    return InputFile(Path("x.parquet"), 0, 0, sum(row_group_rows), row_group_rows, ("text",))


def test_plan_shards_takes_whole_row_groups_until_the_shard_is_full() -> None:
    shards = plan_shards([input_file((3, 3, 3, 1)), input_file((7,)), input_file(())], rows_per_shard=5)
    assert shards == [
        Shard(file_index=0, shard_index=0, row_groups=(0, 1), num_rows=6),
        Shard(file_index=0, shard_index=1, row_groups=(2, 3), num_rows=4),
        Shard(file_index=1, shard_index=0, row_groups=(0,), num_rows=7),
    ]
    assert [shard.name for shard in shards] == [
        "part-00000-00000.parquet",
        "part-00000-00001.parquet",
        "part-00001-00000.parquet",
    ]


def test_plan_shards_covers_every_row_group_once() -> None:
    files = [input_file((5, 1, 9, 4, 4, 2)), input_file((1, 1, 1))]
    for rows_per_shard in (1, 4, 10, 1000):
        shards = plan_shards(files, rows_per_shard)
        for index, found in enumerate(files):
            mine = [shard for shard in shards if shard.file_index == index]
            assert [group for shard in mine for group in shard.row_groups] == list(range(len(found.row_group_rows)))
            assert sum(shard.num_rows for shard in mine) == found.num_rows
            assert [shard.shard_index for shard in mine] == list(range(len(mine)))


def test_read_shard_streams_the_shards_rows_in_order(tmp_path: Path) -> None:
    texts = [f"t{i}" for i in range(10)]
    path = write_texts(tmp_path / "x.parquet", texts, row_group_size=3)
    [found] = inspect_inputs([path], "text", None, None)
    shards = plan_shards([found], rows_per_shard=5)
    assert [shard.row_groups for shard in shards] == [(0, 1), (2, 3)]
    read = []
    for shard in shards:
        batches = list(read_shard(found, shard, batch_rows=4))
        assert all(batch.num_rows <= 4 for batch in batches)
        read.append([text for batch in batches for text in batch.column("text").to_pylist()])
    assert read == [texts[:6], texts[6:]]
