"""Queued jobs confined to ``--allow-root`` directories, without a model or a queue."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelless import fake_model_dir, manifest

from worker.config import RunConfig
from worker.confinement import check_confined, with_absolute_paths
from worker.errors import PathNotAllowed, UsageError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    (root / "data").mkdir(parents=True)
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"text": ["x"]}), root / "data" / name)
    fake_model_dir(root / "model", manifest("embed"))
    return root


@pytest.fixture
def config(root: Path) -> RunConfig:
    return RunConfig(model_dir=root / "model", input=str(root / "data" / "*.parquet"), output=root / "out", text_column="text")


def test_a_job_inside_the_roots_passes(config: RunConfig, root: Path, tmp_path: Path) -> None:
    check_confined(config, [root])
    check_confined(config, [tmp_path / "elsewhere", root])  # any one root will do


def test_no_root_at_all_is_a_usage_error(config: RunConfig) -> None:
    with pytest.raises(UsageError, match="no --allow-root given"):
        check_confined(config, [])


@pytest.mark.parametrize("option", ["--model", "--output", "--input"])
def test_a_path_outside_the_roots_is_refused_naming_the_option(config: RunConfig, root: Path, tmp_path: Path, option: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    if option == "--model":
        fake_model_dir(outside / "model", manifest("embed"))
        config = replace(config, model_dir=outside / "model")
    elif option == "--output":
        config = replace(config, output=outside / "out")
    else:
        pq.write_table(pa.table({"text": ["x"]}), outside / "c.parquet")
        config = replace(config, input=str(outside / "*.parquet"))
    with pytest.raises(PathNotAllowed, match=f"^{option} .*outside the allowed roots \\({re.escape(str(root))}\\)"):
        check_confined(config, [root])


def test_dot_dot_is_resolved_before_the_check(config: RunConfig, root: Path, tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed, match=re.escape(f"--output {root}/../escaped: resolves to {tmp_path}/escaped")):
        check_confined(replace(config, output=root / ".." / "escaped"), [root])


def test_a_symlink_out_of_a_root_is_followed_and_refused(config: RunConfig, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"text": ["private"]}), secret)
    os.symlink(secret, root / "data" / "z.parquet")  # one file of the glob leads outside
    with pytest.raises(PathNotAllowed, match=re.escape(f"--input {root}/data/z.parquet: resolves to {secret}")):
        check_confined(config, [root])


def test_a_model_directory_whose_files_lead_outside_is_refused(config: RunConfig, root: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.onnx"
    weights.write_bytes(b"outside")
    model_file = root / "model" / "model.onnx"
    model_file.unlink()
    os.symlink(weights, model_file)
    with pytest.raises(PathNotAllowed, match=re.escape(f"--model {model_file}: resolves to {weights}")):
        check_confined(config, [root])


def test_a_glob_is_refused_by_its_fixed_part_before_anything_is_listed(config: RunConfig, root: Path, tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed, match=re.escape(f"--input {tmp_path}: resolves to")):
        check_confined(replace(config, input=str(tmp_path / "*" / "*.parquet")), [root])


def test_absolute_paths_keep_dot_dot_and_symlinks_for_the_worker_to_resolve(
    config: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = replace(config, model_dir=Path("allowed/model"), input="allowed/data/../data/*.parquet", output=Path("out"))
    absolute = with_absolute_paths(relative)
    assert absolute.model_dir == tmp_path / "allowed" / "model"
    assert absolute.input == f"{tmp_path}/allowed/data/../data/*.parquet"
    assert absolute.output == tmp_path / "out"
    assert replace(absolute, model_dir=config.model_dir, input=config.input, output=config.output) == config


def test_a_calibration_file_outside_the_roots_is_refused(config: RunConfig, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "calibration.parquet"
    pq.write_table(pa.table({"embedding": [[0.1, 0.2]]}), outside)
    with pytest.raises(PathNotAllowed, match="--calibration"):
        check_confined(replace(config, embedding_dtype="int8", calibration=outside), [root])
    inside = root / "data" / "calibration.parquet"
    check_confined(replace(config, embedding_dtype="int8", calibration=inside), [root])
    assert with_absolute_paths(replace(config, calibration=Path("relative.parquet"))).calibration == Path.cwd() / "relative.parquet"
