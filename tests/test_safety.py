"""Safety: a job writes nothing outside its output directory and never deletes its inputs;
an export never runs code shipped inside a checkpoint (pickled weights, remote code)."""

from __future__ import annotations

import builtins
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from exporter.errors import SourceError
from exporter.export import ExportConfig, ExportResult, export_model
from exporter.source import load_model, resolve_source
from worker.cli import app
from worker.exit_codes import ExitCode

BOOKKEEPING = {"_bertbatch_job.json", "_SUCCESS", ".bertbatch.lock"}
SHARD_NAME = re.compile(r"part-\d{5}-\d{5}\.parquet")


def write_texts(path: Path, count: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [f"row {i} of {path.name}" for i in range(count)]}), path, row_group_size=5)
    return path


def run(model: Path, source: Path | str, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["run", "--model", str(model), "--input", str(source), "--output", str(output), "--text-column", "text", "--rows-per-shard", "5", *extra]
    )
    return result.exit_code, result.output


def snapshot(root: Path, skip: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and skip not in p.parents}


@pytest.mark.parametrize(
    "source",
    ["inputs", "inputs/**/*.parquet", "inputs/sub dir/../sub dir/..x.parquet"],
    ids=["directory", "glob", "dotted path"],
)
def test_outputs_stay_inside_the_output_directory_whatever_the_input_names(
    tmp_path: Path, tiny_embed_export: ExportResult, source: str
) -> None:
    for name in ["a b\nc.parquet", "ü..ñ.parquet", "sub dir/..x.parquet", "sub dir/..%2F..%2Fescape.parquet"]:
        write_texts(tmp_path / "inputs" / name)
    output = tmp_path / "nested" / "out"
    before = snapshot(tmp_path, output)

    code, log = run(tiny_embed_export.directory, str(tmp_path / source), output)
    assert code == 0, log

    assert snapshot(tmp_path, output) == before, "a file outside the output directory was written"
    written = {path.relative_to(output) for path in output.rglob("*")}
    assert all(len(path.parts) == 1 for path in written), written
    names = {path.name for path in written}
    assert names >= BOOKKEEPING
    assert all(SHARD_NAME.fullmatch(name) for name in names - BOOKKEEPING), names


def test_an_output_inside_the_input_directory_is_never_read_back(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    inputs = tmp_path / "data"
    write_texts(inputs / "a.parquet")
    output = inputs / "embedded"
    assert run(tiny_embed_export.directory, str(inputs), output)[0] == 0
    code, log = run(tiny_embed_export.directory, str(inputs), output)
    assert code == 0 and "job already complete" in log, log  # not a different job with more inputs
    assert pq.read_table(output).num_rows == 12


def test_overwrite_never_deletes_the_inputs(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    inputs = tmp_path / "data"
    source = write_texts(inputs / "a.parquet")
    content = source.read_bytes()
    code, log = run(tiny_embed_export.directory, str(inputs), inputs, "--overwrite")
    assert code == ExitCode.INPUT_ERROR, log
    assert f"every input file is inside the output directory {inputs}" in log
    assert source.read_bytes() == content


def save_checkpoint_config(directory: Path, source: Path, **changes: object) -> None:
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_weights_with_code_are_refused_without_running_it(
    tmp_path: Path, tiny_base_checkpoint: Path, offline_hub: Path, zip_format: bool
) -> None:
    import torch
    import transformers

    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint_config(checkpoint, tiny_base_checkpoint)
    (checkpoint / "model.safetensors").unlink()  # only the pickle is left to load
    state = dict(transformers.BertModel.from_pretrained(tiny_base_checkpoint).state_dict())
    state["payload"] = Payload(marker)
    torch.save(state, checkpoint / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)

    with pytest.raises(SourceError, match="cannot load weights"):
        export_model(ExportConfig(source=str(checkpoint), task="embed", out=tmp_path / "model"), log=lambda line: None)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert not (tmp_path / "model").exists()

    torch.load(checkpoint / "pytorch_model.bin", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("model_type", ["bert", "custom-bert"])
def test_remote_code_in_a_checkpoint_never_runs(tmp_path: Path, tiny_base_checkpoint: Path, offline_hub: Path, model_type: str) -> None:
    import transformers

    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoint"
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    save_checkpoint_config(checkpoint, tiny_base_checkpoint, model_type=model_type, auto_map=auto_map)
    side_effect = f"open({str(marker)!r}, 'w').write('code ran')\n"
    (checkpoint / "configuration_custom.py").write_text(
        side_effect + "from transformers import BertConfig\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
    )
    (checkpoint / "modeling_custom.py").write_text(side_effect + "from transformers import BertModel\nclass CustomModel(BertModel):\n    pass\n")

    resolved = resolve_source(str(checkpoint))
    if model_type == "bert":  # transformers knows the type: its own code loads it, the auto_map is ignored
        model, _ = load_model(resolved, "embed")
        assert type(model) is transformers.BertModel
    else:  # only the checkpoint's code knows the type: refused
        with pytest.raises(SourceError, match="trust_remote_code"):
            load_model(resolved, "embed")
    assert not marker.exists(), "the checkpoint's Python code ran"
