"""Packed attention's numbers, checked on a CPU.

onnxruntime runs RemovePadding, PackedAttention and RestorePadding on CUDA only. Here the
packed graph runs in ``onnx.reference.ReferenceEvaluator`` with numpy versions of the
com.microsoft operators (contrib_reference.py), and its outputs are compared with
onnxruntime CPU running the fused (padded) graph. The reference operators are first
checked where onnxruntime can judge them: on the fused graph itself.

Every float weight of the tiny exports is perturbed first: a fresh BertConfig has zero
biases, unit layer-norm scales and near-uniform masked-LM probabilities, under which a
misplaced bias or a wrong row would not show.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from exporter.export import ExportResult
from exporter.packing import convert_to_packed_attention
from worker.batching import iter_padded_batches
from worker.modeldir.manifest import MODEL_FILE, read_manifest
from worker.modeldir.padding import pad_rows
from worker.tokenize import load_tokenizer, tokenize_window
from contrib_reference import DOMAIN, check_packing, evaluate, reference_evaluator, right_padded_lengths
from test_packing import CHECKPOINT_FIXTURES, TINY_LAYERS, fused_exports  # noqa: F401 (fused_exports is a fixture)

# Every row has a [MASK], so the masked-LM head has rows to fill in every batch.
TEXTS = [
    "the capital of france is [MASK].",
    "[MASK]",
    "a much longer row, with [MASK] words and another [MASK] near the end of it, padding the others",
    "hello [MASK] world",
    "two [MASK] here",
    "[MASK] starts this row of middling length",
]
PAIRS = ["is it [MASK]?", "", "yes it is", "a second segment of some [MASK] length"]
ENCODER_CONTRIB_OPS = {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
# Relative tolerance against onnxruntime CPU: float32 rounding, or float16 rounding of the encoder
# (the reference rounds once per operator, onnxruntime's float16 kernels at other points).
RTOL = {"fp32": 1e-4, "fp16": 1e-2}
PRECISIONS = pytest.mark.parametrize("precision", sorted(RTOL))
TASKS = pytest.mark.parametrize("task", sorted(CHECKPOINT_FIXTURES))
Feeds = dict[str, np.ndarray]


def perturb_weights(model_file: Path, out: Path, seed: int = 0) -> None:
    """Copy a model with noise added to every float initializer (ones shared by name stay shared)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_file))
    rng = np.random.default_rng(seed)
    for initializer in model.graph.initializer:
        if initializer.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            array = numpy_helper.to_array(initializer)
            noise = rng.normal(0.0, 0.5 if array.ndim == 1 else 0.1, array.shape)
            initializer.CopyFrom(numpy_helper.from_array((array + noise).astype(array.dtype), initializer.name))
    onnx.save(model, str(out))


@pytest.fixture(scope="module")
def graphs(fused_exports, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    """Per (task, precision): the perturbed fused graph and its packed conversion (our restore point)."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(task: str, precision: str = "fp32") -> tuple[Path, Path]:
        if (task, precision) not in cache:
            directory = tmp_path_factory.mktemp(f"perturbed-{task}-{precision}")
            fused, packed = directory / "fused.onnx", directory / "packed.onnx"
            perturb_weights(fused_exports(task, precision == "fp16").directory / MODEL_FILE, fused)
            shutil.copyfile(fused, packed)
            convert_to_packed_attention(packed, TINY_LAYERS)
            cache[task, precision] = fused, packed
        return cache[task, precision]

    return get


def worker_batches(model_directory: Path) -> list[Feeds]:
    """Right-padded batches as the worker builds them: mixed lengths padded to a multiple of 8, sentence
    pairs (segment ids 1), and single rows."""
    manifest = read_manifest(model_directory)
    tokenizer = load_tokenizer(model_directory / manifest.tokenizer_file, manifest.max_length)
    pad = manifest.special_tokens.pad
    window = tokenize_window(tokenizer, TEXTS)
    batches = [
        (batch.input_ids, batch.attention_mask, batch.token_type_ids)
        for batch in iter_padded_batches(window.token_ids, window.type_ids, pad, max_rows=4, multiple_of=8)
    ]
    pairs = tokenize_window(tokenizer, TEXTS[: len(PAIRS)], PAIRS)
    batches.append(pad_rows(pairs.token_ids, pairs.type_ids, pad, multiple_of=8))
    for row in (0, 2):  # single-segment rows: the tokenizer gives no type ids
        batches.append(pad_rows(window.token_ids[row : row + 1], None, pad, multiple_of=8))
    feeds = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": types} for ids, mask, types in batches]
    lengths = [set(feed["attention_mask"].sum(axis=1).tolist()) for feed in feeds]
    assert any(len(row_lengths) > 1 for row_lengths in lengths) and any(len(f["input_ids"]) == 1 for f in feeds)
    return feeds


def onnxruntime_cpu(model_file: Path, feeds: list[Feeds]) -> tuple[list[str], list[list[np.ndarray]]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return [output.name for output in session.get_outputs()], [session.run(None, feed) for feed in feeds]


def assert_outputs_match(
    names: list[str], got: list[np.ndarray], expected: list[np.ndarray], rtol: float, where: str,
    valid: np.ndarray | None = None,
) -> None:
    """Integer outputs (mask positions, top ids) exactly, float outputs within ``rtol``; per-token
    outputs (``token_probs``) at the ``valid`` (real) tokens only: nothing reads padding positions,
    which the packed graph zero-fills and the fused one computes from padding."""
    for name, actual, wanted in zip(names, got, expected, strict=True):
        assert actual.shape == wanted.shape and actual.dtype == wanted.dtype, (where, name, actual.shape, wanted.shape)
        if name == "token_probs" and valid is not None:
            actual, wanted = actual[valid], wanted[valid]
        if np.issubdtype(wanted.dtype, np.integer):
            np.testing.assert_array_equal(actual, wanted, err_msg=f"{where}: {name}")
        else:
            # Relative, with a floor at the output's own scale for elements near zero: masked-LM
            # probabilities are ~1e-3, where a fixed absolute 1e-5 would hide a wrong row.
            floor = 0.01
            if name == "token_probs" and rtol > RTOL["fp32"]:
                # The tiny token head is scaled 10x to make labels decisive: the two float16 roundings of
                # the encoder (reference, onnxruntime) move its logits by ~3e-2, a 0.1 probability by 2.6e-3
                # (measured). The encoder itself is compared token by token, before the head, below.
                floor = 0.5
            atol = rtol * floor * float(np.abs(wanted).max(initial=0.0))
            np.testing.assert_allclose(actual, wanted, rtol=rtol, atol=atol, err_msg=f"{where}: {name}")


def op_types(model_file: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(model_file)).graph.node}


def assert_reference_matches_onnxruntime(graph: Path, fused: Path, export: ExportResult, label: str, rtol: float) -> None:
    """``graph`` run by the reference evaluator gives what onnxruntime CPU gives for the fused graph, batch by batch."""
    feeds = worker_batches(export.directory)
    names, expected = onnxruntime_cpu(fused, feeds)
    evaluator = reference_evaluator(graph)
    for feed, wanted in zip(feeds, expected):
        assert_outputs_match(
            names, evaluate(evaluator, feed), wanted, rtol, f"{label} {feed['input_ids'].shape}", feed["attention_mask"].astype(bool)
        )


def test_every_task_has_a_reference_test() -> None:
    from exporter.tasks import TASK_SPECS

    assert set(CHECKPOINT_FIXTURES) == set(TASK_SPECS)


@PRECISIONS
@TASKS
def test_reference_operators_match_onnxruntime_on_the_fused_graph(task: str, precision: str, fused_exports, graphs) -> None:  # type: ignore[no-untyped-def]
    fused, _ = graphs(task, precision)
    assert ENCODER_CONTRIB_OPS <= op_types(fused)  # the reference ops are what runs here, not a no-op
    assert_reference_matches_onnxruntime(fused, fused, fused_exports(task, precision == "fp16"), f"{task} {precision} fused", RTOL[precision])


@PRECISIONS
@TASKS
def test_packed_graph_matches_onnxruntime_on_the_fused_graph(task: str, precision: str, fused_exports, graphs) -> None:  # type: ignore[no-untyped-def]
    fused, packed = graphs(task, precision)
    assert {"RemovePadding", "PackedAttention", "RestorePadding"} <= op_types(packed)
    assert "Attention" not in op_types(packed)
    assert_reference_matches_onnxruntime(packed, fused, fused_exports(task, precision == "fp16"), f"{task} {precision} packed", RTOL[precision])


@PRECISIONS
@TASKS
def test_packed_encoder_output_is_the_fused_one_with_zero_padding(task: str, precision: str, fused_exports, graphs) -> None:  # type: ignore[no-untyped-def]
    """Token by token, before any head pools it away, both graphs in the reference: RestorePadding's
    output is the fused encoder's output at every real token and zero at every padding position."""
    import onnx

    fused, packed = graphs(task, precision)
    restore = next(node for node in onnx.load(str(packed)).graph.node if node.op_type == "RestorePadding")
    encoder_output = restore.output[0]  # the converter gives it the fused graph's name for that tensor
    fused_evaluator, packed_evaluator = reference_evaluator(fused), reference_evaluator(packed)
    for feed in worker_batches(fused_exports(task, precision == "fp16").directory):
        (padded,) = evaluate(fused_evaluator, feed, [encoder_output])
        (restored,) = evaluate(packed_evaluator, feed, [encoder_output])
        real = feed["attention_mask"].astype(bool)
        assert restored.shape == padded.shape
        np.testing.assert_allclose(restored[real], padded[real], rtol=1e-5, atol=1e-5)
        assert not restored[~real].any()


@PRECISIONS
@TASKS
def test_onnxruntime_accepts_the_packed_graph_types(task: str, precision: str, graphs) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime resolves the whole packed graph against the contrib schemas (int32 token offsets and
    sequence lengths included) and stops only at the missing CPU kernel."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as KernelMissing

    _, packed = graphs(task, precision)
    with pytest.raises(KernelMissing, match="RemovePadding"):
        onnxruntime.InferenceSession(str(packed), providers=["CPUExecutionProvider"])


def test_stock_converter_fails_in_the_masked_lm_head(fused_exports, graphs) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime's own converter restores padding after the masked-LM head's layer norm, so the head
    reads the packed ``[tokens, hidden]`` encoder output: its ``Shape`` has no sequence axis and the
    gather of the [MASK] rows fails (index 2 of a 2-element shape). Our restore point runs the same
    batches (test_packed_graph_matches_onnxruntime_on_the_fused_graph)."""
    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    fused, _ = graphs("fill-mask")
    model = OnnxModel(onnx.load(str(fused)))
    PackingMode(model).convert(use_symbolic_shape_infer=False)
    model.topological_sort()
    evaluator = reference_evaluator(model.model)
    for feed in worker_batches(fused_exports("fill-mask").directory):
        with pytest.raises(IndexError, match="out of bounds"):
            evaluate(evaluator, feed)


def test_padding_layout_follows_the_schema_example() -> None:
    """The RemovePadding example of docs/ContribOperators.md (rows of 1, 2 and 4 tokens out of 4), through
    RemovePadding then RestorePadding in a graph of their own."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("RemovePadding", ["hidden", "lengths"], ["packed", "offset", "cumulative", "longest"], domain=DOMAIN),
            helper.make_node("RestorePadding", ["packed", "offset"], ["restored"], domain=DOMAIN),
        ],
        "padding",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [3, 4, 1]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, [3])],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)
         for name in ("packed", "offset", "cumulative", "longest", "restored")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    lengths = np.array([1, 2, 4], dtype=np.int32)
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    packed, token_offset, cumulative, longest, restored = evaluate(
        reference_evaluator(model), {"hidden": hidden, "lengths": lengths}
    )
    assert token_offset.dtype == cumulative.dtype == longest.dtype == np.int32
    assert token_offset.reshape(-1).tolist() == [0, 4, 5, 8, 9, 10, 11, 1, 2, 3, 6, 7]
    assert cumulative.tolist() == [0, 1, 3, 7] and longest.tolist() == [4]
    assert packed[:, 0].tolist() == [0, 4, 5, 8, 9, 10, 11]
    np.testing.assert_array_equal(restored, np.where(np.arange(4)[None, :, None] < lengths[:, None, None], hidden, 0))
    check_packing(token_offset, cumulative, token_count=7)


def test_reference_refuses_what_cpu_and_cuda_read_differently() -> None:
    # A hole in the mask: onnxruntime's CPU mask index counts 2 tokens, its CUDA one stops at 1.
    with pytest.raises(ValueError, match="right-padded"):
        right_padded_lengths(np.array([[1, 0, 1, 0]], dtype=np.int32))
    # Offsets that disagree with the cumulative lengths: fused and unfused CUDA kernels would differ.
    token_offset = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.int32)
    with pytest.raises(ValueError, match="token_offset"):
        check_packing(token_offset, np.array([0, 1, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="int32"):
        check_packing(token_offset.astype(np.int64), np.array([0, 4, 8], dtype=np.int32))
