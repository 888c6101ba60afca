"""Packed (padding-free) attention: the graph rewrite, checked anywhere; its numbers, on CUDA only."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from exporter.errors import DeviceRequired, ExportError, OptimizationError
from exporter.export import ExportConfig, ExportResult, export_model, revalidate
from exporter.packing import check_packed_graph, convert_to_packed_attention
from worker.cli import app
from worker.exit_codes import ExitCode
from worker.modeldir.manifest import MODEL_FILE, read_manifest

TINY_LAYERS = 2
CHECKPOINT_FIXTURES = {
    "embed": "tiny_base_checkpoint",
    "fill-mask": "tiny_mlm_checkpoint",
    "classify": "tiny_classifier_checkpoint",
    "token-classify": "tiny_token_classifier_checkpoint",
}


def cuda_available() -> bool:
    from worker.modeldir.session import cuda_usable

    return cuda_usable()


@pytest.fixture(scope="module")
def fused_exports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A validated fused export per (task, precision), made once per module."""
    cache: dict[tuple[str, bool], ExportResult] = {}

    def get(task: str, fp16: bool = False) -> ExportResult:
        if (task, fp16) not in cache:
            checkpoint = request.getfixturevalue(CHECKPOINT_FIXTURES[task])
            out = tmp_path_factory.mktemp("fused") / f"{task}-{'fp16' if fp16 else 'fp32'}"
            config = ExportConfig(source=str(checkpoint), task=task, out=out, optimize=True, fp16=fp16)  # type: ignore[arg-type]
            cache[task, fp16] = export_model(config, log=lambda line: None)
        return cache[task, fp16]

    return get


def packed_copy(export: ExportResult, tmp_path: Path) -> Path:
    model = tmp_path / MODEL_FILE
    shutil.copyfile(export.directory / MODEL_FILE, model)
    return model


def ops(model_file: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(model_file)).graph.node)


def test_every_task_has_a_packing_test() -> None:
    from exporter.tasks import TASK_SPECS

    assert set(CHECKPOINT_FIXTURES) == set(TASK_SPECS)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("task", sorted(CHECKPOINT_FIXTURES))
def test_packing_covers_exactly_the_encoder(task: str, fp16: bool, fused_exports, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    export = fused_exports(task, fp16)
    model = packed_copy(export, tmp_path)
    before = ops(model)

    record = convert_to_packed_attention(model, TINY_LAYERS)

    after = ops(model)
    assert record["operators"] == {"RemovePadding": 1, "PackedAttention": TINY_LAYERS, "RestorePadding": 1}
    assert after["Attention"] == 0 and after["PackedAttention"] == before["Attention"] == TINY_LAYERS
    # The heads are untouched: every other operator is still there, as many times.
    unchanged = {op: n for op, n in before.items() if op != "Attention"}
    assert {op: after[op] for op in unchanged} == unchanged
    # Inputs and outputs are the worker's contract: packing must not change them.
    import onnx

    def interface(path: Path) -> list[tuple[str, int]]:
        graph = onnx.load(str(path)).graph
        return [(v.name, v.type.tensor_type.elem_type) for v in list(graph.input) + list(graph.output)]

    assert interface(model) == interface(export.directory / MODEL_FILE)


def test_stock_converter_on_a_masked_lm_is_caught(fused_exports, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime's own converter restores padding after the masked-LM head's layer norm, past the
    [MASK] gather; the check refuses that graph (this is why the exporter picks the restore point)."""
    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(fused_exports("fill-mask").directory / MODEL_FILE)))
    PackingMode(model).convert(use_symbolic_shape_infer=False)
    with pytest.raises(OptimizationError, match="reading packed"):
        check_packed_graph(model.model, TINY_LAYERS)


def test_packing_needs_the_fused_graph(tiny_embed_export: ExportResult, tmp_path: Path) -> None:
    model = packed_copy(tiny_embed_export, tmp_path)
    with pytest.raises(OptimizationError, match="fused graph"):
        convert_to_packed_attention(model, TINY_LAYERS)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"quantize": "int8"}, "int8"), ({"layers": "sum-last-four"}, "--layers last")],
)
def test_packed_refuses_what_it_cannot_serve(options: dict[str, object], message: str, tmp_path: Path) -> None:
    config = ExportConfig(source="unused", task="embed", out=tmp_path / "model", packed=True, **options)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=message):
        export_model(config, log=lambda line: None)
    assert not (tmp_path / "model").exists()


def test_packed_export_without_cuda_exits_6_and_writes_nothing(tiny_base_checkpoint: Path, tmp_path: Path) -> None:
    if cuda_available():
        pytest.skip("onnxruntime has CUDA here: test_packed_export_matches_pytorch_on_cuda covers this machine")
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(tiny_base_checkpoint), "--task", "embed", "--out", str(out), "--packed", "--fp16"])
    assert result.exit_code == ExitCode.DEVICE_UNAVAILABLE == 6, result.output
    assert "CUDA only" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_revalidating_a_packed_model_on_cpu_is_refused(fused_exports, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A packed model's manifest sends validation (and the worker) to CUDA; CPU is refused with exit 6."""
    from dataclasses import replace

    from worker.modeldir.manifest import write_manifest

    export = fused_exports("embed")
    directory = tmp_path / "packed"
    shutil.copytree(export.directory, directory)
    convert_to_packed_attention(directory / MODEL_FILE, TINY_LAYERS)
    write_manifest(directory, replace(read_manifest(directory), attention="packed"))
    with pytest.raises(DeviceRequired, match="CUDA only") as refused:
        revalidate(directory, log=lambda line: None, device="cpu")
    assert refused.value.exit_code == ExitCode.DEVICE_UNAVAILABLE
    if not cuda_available():
        with pytest.raises(DeviceRequired):
            revalidate(directory, log=lambda line: None)


@pytest.mark.gpu
@pytest.mark.parametrize("task", sorted(CHECKPOINT_FIXTURES))
def test_packed_export_matches_pytorch_on_cuda(task: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not cuda_available():
        pytest.skip("no CUDA execution provider: packed attention cannot run here")
    checkpoint = request.getfixturevalue(CHECKPOINT_FIXTURES[task])
    result = export_model(
        ExportConfig(source=str(checkpoint), task=task, out=tmp_path / "packed", fp16=True, packed=True),  # type: ignore[arg-type]
        log=lambda line: None,
    )
    manifest = read_manifest(result.directory)
    assert manifest.validated and manifest.attention == "packed"
    assert manifest.validation["onnx"] == "onnxruntime CUDAExecutionProvider, TF32 off"
    assert ops(result.directory / MODEL_FILE)["PackedAttention"] == TINY_LAYERS
    assert revalidate(result.directory, log=lambda line: None).passed


@pytest.mark.gpu
def test_packed_worker_on_cuda_matches_the_padded_export_on_cpu(
    tiny_base_checkpoint: Path, tiny_embed_export: ExportResult, tmp_path: Path
) -> None:
    if not cuda_available():
        pytest.skip("no CUDA execution provider: packed attention cannot run here")
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["short", "a somewhat longer row of text that pads the others", "", None, "mid length row here"] * 20
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts}), data)
    packed = tmp_path / "packed"
    export_model(ExportConfig(source=str(tiny_base_checkpoint), task="embed", out=packed, packed=True), log=lambda line: None)
    runner = CliRunner()
    for model, device, out in ((packed, "cuda", "gpu"), (tiny_embed_export.directory, "cpu", "cpu")):
        result = runner.invoke(app, ["run", "--input", str(data), "--output", str(tmp_path / out), "--text-column", "text",
                                     "--model", str(model), "--device", device])
        assert result.exit_code == 0, result.output
    gpu = pq.read_table(tmp_path / "gpu").column("embedding").to_pylist()
    cpu = pq.read_table(tmp_path / "cpu").column("embedding").to_pylist()
    assert [row is None for row in gpu] == [row is None for row in cpu]
    for got, expected in zip(gpu, cpu):
        if expected is not None:
            np.testing.assert_allclose(got, expected, atol=1e-4)
