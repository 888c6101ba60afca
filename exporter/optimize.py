"""Optimized variants of an exported graph: fused transformer ops, float16, dynamic int8.

Each step rewrites ``model.onnx`` in place, so a model directory always holds one
ONNX file, the final variant. float16 and int8 start from the fused graph, as
onnxruntime recommends: its fused operators are what run fast in reduced precision.
Every step checks that it did what it must and raises ``OptimizationError``
otherwise; an "optimized" model whose attention silently stayed unfused is worse
than none. The in-graph heads (pooling, softmax, top-k, nonzero) are left in
float32 and are never quantized.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from exporter.errors import ExportError, OptimizationError
from exporter.onnx_files import has_external_data, save_graph
from worker.atomic import commit
from worker.modeldir.manifest import Layers, Precision
from worker.modeldir.session import create_session

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto

Quantization = Literal["int8"]

# onnxruntime's transformer optimizer: BERT fusions, and only graph rewrites that
# hold on every execution provider (level 1), so one file serves CPU and GPU.
OPTIMIZER_MODEL_TYPE = "bert"
OPTIMIZER_OPT_LEVEL = 1
ATTENTION_OP_TYPES = ("Attention", "MultiHeadAttention")
FUSED_OP_TYPES = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
)
# The encoder's operators once fused; float16 converts these and nothing else,
# so the heads (pooling, normalisation, softmax over the vocabulary) stay float32.
FLOAT16_OP_TYPES = frozenset(
    {"EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "MatMul"}
)
# Dynamic quantization as Optimum's AutoQuantizationConfig.avx512_vnni / arm64 do it:
# int8 symmetric per-channel weights, uint8 activations quantized at run time, MatMul
# only. The fused Attention (Q/K/V projections) stays float32: quantizing it too is faster
# but costs agreement. all-MiniLM-L6-v2 on 2 AVX2 cores, 600 benchmark rows, cosine to fp32:
# this scheme 1.34x fp32, mean 0.9894; + QAttention 1.53x, mean 0.9836; the unfused graph with
# Q/K/V quantized too 1.54x, 0.9838; with only V 1.37x, 0.9870 (BENCHMARKS.md).
INT8_OP_TYPES = ("MatMul",)
_QUANTIZED_MATMUL_OP_TYPES = ("MatMulInteger", "DynamicQuantizeMatMul")
_ENCODER_CONSUMERS = frozenset({"SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "LayerNormalization", "Attention"})


@dataclass(frozen=True)
class EncoderShape:
    """What the attention fusion must be told: it cannot reliably detect these itself."""

    num_heads: int
    hidden_size: int
    num_layers: int
    model_type: str = "bert"  # the family, named in errors and the manifest
    # Why attention cannot fuse in this family (ArchitectureSpec.not_fusable); None: it must, in every layer.
    unfused_attention: str | None = None


def encoder_shape(model_config: Any, layers: Layers = "last") -> EncoderShape:
    """The shape of the encoder as the exported graph holds it.

    When only the second-to-last layer feeds the head, the last layer is dead code
    and is not in the graph, so one attention fewer can fuse.
    """
    num_layers = int(model_config.num_hidden_layers)
    return EncoderShape(
        num_heads=int(model_config.num_attention_heads),
        hidden_size=int(model_config.hidden_size),
        num_layers=num_layers - 1 if layers == "second-to-last" else num_layers,
    )


def variant_precision(fp16: bool, quantize: Quantization | None) -> Precision:
    """The precision of the final graph; float16 and int8 exclude each other."""
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r} is not supported; bertbatch quantizes to int8")
    if fp16 and quantize is not None:
        raise ExportError("--fp16 and --quantize int8 exclude each other: fp16 is for GPUs, int8 for CPUs; pick one")
    if fp16:
        return "fp16"
    return "int8" if quantize == "int8" else "fp32"


def optimize_onnx(
    model_path: Path,
    shape: EncoderShape,
    fp16: bool = False,
    quantize: Quantization | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fuse, then convert to float16 or quantize to int8 if asked; return what the manifest records."""
    precision = variant_precision(fp16, quantize)
    log(f"fusing transformer operators with onnxruntime {_onnxruntime_version()} (num_heads {shape.num_heads}, "
        f"hidden_size {shape.hidden_size})")
    record = fuse_transformer_ops(model_path, shape)
    log("  fused: " + ", ".join(f"{op} {n}" for op, n in record["fused"].items() if n))
    if shape.unfused_attention:
        log(f"  attention stays unfused in {shape.model_type}: {shape.unfused_attention}")
    if precision == "fp16":
        log("converting the encoder to float16 (inputs, outputs and in-graph heads stay float32)")
        record["float16"] = convert_to_float16(model_path, attention_fused=shape.unfused_attention is None)
    elif precision == "int8":
        log("quantizing MatMul weights to int8 (dynamic quantization, per-channel)")
        record["quantization"] = quantize_to_int8(model_path)
    check_loads(model_path)
    return record


def fuse_transformer_ops(model_path: Path, shape: EncoderShape) -> dict[str, Any]:
    """Run onnxruntime's BERT optimizer; raise ``OptimizationError`` unless attention fused in every layer."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    before = onnx.load(str(model_path))
    try:
        optimized = optimize_model(
            str(model_path),
            model_type=OPTIMIZER_MODEL_TYPE,
            num_heads=shape.num_heads,
            hidden_size=shape.hidden_size,
            opt_level=OPTIMIZER_OPT_LEVEL,
        )
    except Exception as error:  # the optimizer asserts and raises many internal types
        raise OptimizationError(
            f"{model_path}: onnxruntime's transformer optimizer failed: {type(error).__name__}: {error}"
        ) from error
    counts = count_ops(optimized.model)
    fused = {op: counts.get(op, 0) for op in FUSED_OP_TYPES}
    attention = sum(fused[op] for op in ATTENTION_OP_TYPES)
    expected = 0 if shape.unfused_attention else shape.num_layers
    if attention != expected:
        raise OptimizationError(
            f"{model_path}: attention fused in {attention} of {shape.num_layers} layers of this {shape.model_type} graph "
            f"(fused operators: {_describe(fused)}; expected {expected} Attention with num_heads "
            f"{shape.num_heads}, hidden_size {shape.hidden_size}). The graph does not match the pattern "
            "onnxruntime's BERT optimizer knows; export without --optimize/--fp16/--quantize, or report the checkpoint."
        )
    if not any(fused.values()):
        raise OptimizationError(f"{model_path}: onnxruntime's optimizer fused nothing in this {shape.model_type} graph")
    _check_interface(before, optimized.model, "fusion")
    optimized.topological_sort()
    save_over(optimized.model, model_path)
    return {
        "tool": f"onnxruntime.transformers.optimizer {_onnxruntime_version()}",
        "model_type": OPTIMIZER_MODEL_TYPE,
        "opt_level": OPTIMIZER_OPT_LEVEL,
        "num_heads": shape.num_heads,
        "hidden_size": shape.hidden_size,
        "layers": shape.num_layers,
        "fused": fused,
        "family": shape.model_type,
        # What did not fuse and why: a partly fused graph says so (and is validated like any other).
        "attention": f"not fused: {shape.unfused_attention}" if shape.unfused_attention else "fused in every layer",
        # EmbedLayerNormalization turns the 2-D mask into per-row lengths (onnxruntime's
        # default for BERT, the fast path on GPU): rows must be right-padded, as the worker does.
        "attention_mask": "mask index: rows must be right-padded",
    }


def convert_to_float16(model_path: Path, attention_fused: bool = True) -> dict[str, Any]:
    """Convert the fused encoder to float16, keeping float32 graph inputs, outputs and heads.

    With ``attention_fused`` false (a family whose attention cannot fuse), its MatMuls run
    in float16 and the unfused score arithmetic (scale, bias, mask, softmax) stays float32.
    """
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    before = onnx.load(str(model_path))
    present = {node.op_type for node in before.graph.node}
    if attention_fused and not present & {"Attention", "MultiHeadAttention"}:
        raise OptimizationError(f"{model_path}: float16 conversion expects the fused graph; fuse it first")
    kept_float32 = sorted(present - FLOAT16_OP_TYPES)
    encoder = {node.name for node in encoder_matmuls(before.graph)}
    head_matmuls = [n.name for n in before.graph.node if n.op_type == "MatMul" and n.name and n.name not in encoder]
    model = OnnxModel(onnx.load(str(model_path)))
    try:
        model.convert_float_to_float16(keep_io_types=True, op_block_list=kept_float32, node_block_list=head_matmuls)
    except Exception as error:  # the converter raises AssertionError, ValueError, ...
        raise OptimizationError(f"{model_path}: float16 conversion failed: {type(error).__name__}: {error}") from error
    # OnnxModel's conversion also removes the float32 -> float16 -> float32 Cast pairs
    # it puts between two float32 nodes, so the heads never pass through float16.
    _drop_duplicate_nodes(model.model.graph)
    model.topological_sort()
    _check_interface(before, model.model, "float16 conversion")
    float16 = [t for t in model.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    if not float16:
        raise OptimizationError(f"{model_path}: float16 conversion left no float16 weights")
    save_over(model.model, model_path)
    return {
        "float16_op_types": sorted(FLOAT16_OP_TYPES & present),
        "float32_op_types": kept_float32,
        "float16_initializers": len(float16),
    }


def quantize_to_int8(model_path: Path) -> dict[str, Any]:
    """Dynamic int8 quantization of the encoder's MatMul weights (``quantize_dynamic``).

    The nodes are named explicitly: the quantizer also rewrites Gemm as MatMul, and
    would otherwise quantize the heads' Gemm (pooler, classifier, vocabulary projection).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = onnx.load(str(model_path))
    initializers = {t.name for t in before.graph.initializer}
    candidates = [n.name for n in encoder_matmuls(before.graph) if n.input[1] in initializers]
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=model_path.parent) as scratch:
        source, target = Path(scratch) / "input.onnx", Path(scratch) / model_path.name
        prepared = onnx.load(str(model_path))
        _transpose_tied_gemm_weights(prepared.graph)
        external = has_external_data(model_path)
        onnx.save_model(prepared, str(source), save_as_external_data=external, location="input.onnx.data")
        try:
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_quantize=candidates,
                per_channel=True,
                reduce_range=False,
                weight_type=QuantType.QInt8,
                # Fused ops (com.microsoft) defeat ONNX shape inference; their outputs are float.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
                use_external_data_format=external,
            )
        except Exception as error:
            raise OptimizationError(f"{model_path}: int8 quantization failed: {type(error).__name__}: {error}") from error
        after = onnx.load(str(target))
        quantized = sum(count_ops(after).get(op, 0) for op in _QUANTIZED_MATMUL_OP_TYPES)
        if not candidates or quantized != len(candidates):
            raise OptimizationError(
                f"{model_path}: int8 quantization converted {quantized} of {len(candidates)} encoder MatMul weights; "
                "expected all"
            )
        _check_interface(before, after, "int8 quantization")
        if external:
            save_graph(after, model_path)  # gathers the quantized weights into the model's own data file
        else:
            commit(target, model_path)  # the scratch directory is beside the model: same file system
    return {
        "method": "dynamic",
        "tool": f"onnxruntime.quantization.quantize_dynamic {_onnxruntime_version()}",
        "op_types": list(INT8_OP_TYPES),
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor, computed at run time",
        "quantized_matmuls": quantized,
    }


def encoder_matmuls(graph: GraphProto) -> list[Any]:
    """The encoder's MatMul nodes: each feeds a fused encoder operator (SkipLayerNormalization, BiasGelu).

    A head's MatMul (the token classifier's projection over 3-D hidden states) feeds the head instead,
    and stays float32 under float16 and int8 like the heads' Gemm.
    """
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return [node for node in graph.node if node.op_type == "MatMul" and consumers.get(node.output[0], set()) & _ENCODER_CONSUMERS]


def _transpose_tied_gemm_weights(graph: GraphProto) -> None:
    """Let a Gemm read a weight it shares through an explicit Transpose (``transB=0``).

    Dynamic quantization rewrites every Gemm as MatMul and transposes a ``transB=1``
    weight in place, assuming no other node reads it. The masked-LM head's decoder
    shares (ties) the word embeddings with EmbedLayerNormalization, which would then
    read a transposed table. onnxruntime folds the Transpose when it loads the model.
    See https://github.com/microsoft/onnxruntime/issues/25890.
    """
    from onnx import helper

    initializers = {t.name for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    added = []
    for node in graph.node:
        transposed = [a for a in node.attribute if a.name == "transB" and a.i == 1]
        if node.op_type != "Gemm" or not transposed or node.input[1] not in initializers or readers[node.input[1]] < 2:
            continue
        weight = node.input[1]
        node.input[1] = f"{weight}/transposed_for_{node.name or 'gemm'}"
        transposed[0].i = 0
        added.append(helper.make_node("Transpose", [weight], [node.input[1]], name=f"{node.input[1]}/Transpose"))
    graph.node.extend(added)


def check_loads(model_path: Path) -> None:
    """The final graph must load in onnxruntime; a broken rewrite is an OptimizationError, not a crash later."""
    try:
        create_session(model_path, "cpu")
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
        raise OptimizationError(f"{model_path}: onnxruntime cannot load the optimized graph: {error}") from error


def count_ops(model: ModelProto) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _describe(fused: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in fused.items() if n) or "none"


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _interface(model: ModelProto) -> list[tuple[str, str, int]]:
    return [("input", v.name, v.type.tensor_type.elem_type) for v in model.graph.input] + [
        ("output", v.name, v.type.tensor_type.elem_type) for v in model.graph.output
    ]


def _check_interface(before: ModelProto, after: ModelProto, step: str) -> None:
    """The worker relies on the names and types of inputs and outputs; no step may change them."""
    if _interface(before) != _interface(after):
        raise OptimizationError(
            f"{step} changed the graph's inputs/outputs from {_interface(before)} to {_interface(after)}"
        )


def save_over(model: ModelProto, model_path: Path) -> None:
    """Replace the graph, keeping (or, past 2 GB, starting) its external data file."""
    save_graph(model, model_path)


def _drop_duplicate_nodes(graph: GraphProto) -> None:
    # The converter names the fp16->fp32 Cast after the tensor it reads, so a tensor
    # read by two float32 nodes gets two identical Casts: keep one.
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        serialized = node.SerializeToString(deterministic=True)
        if node.name and node.name in seen:
            if seen[node.name] != serialized:
                raise OptimizationError(f"float16 conversion produced two different nodes named {node.name!r}")
            continue
        seen[node.name] = serialized
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
