"""Padding-free attention: onnxruntime's packing mode (``RemovePadding``, ``PackedAttention``, ``RestorePadding``).

The fused encoder runs on the batch's real tokens only, packed end to end: no FLOP
is spent on padding, which is where the time goes on a GPU with mixed-length rows.
The graph's inputs and outputs do not change (padded ``[batch, sequence]`` in,
pooled embeddings, probabilities or fills out), so the worker feeds it like any
other export.

onnxruntime implements these three operators for CUDA only, so a packed model is
validated, and runs, on CUDA. The conversion itself is a graph rewrite; it is
checked here, on any machine, to cover exactly the encoder: padding is removed
right where the first attention reads the embeddings and restored after the
encoder's last layer norm, and no head (pooling, the masked-LM transform, the
classifier) ever reads a packed tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.architectures import ArchitectureSpec
from exporter.errors import ExportError, OptimizationError
from exporter.optimize import save_over
from worker.modeldir.manifest import Layers

if TYPE_CHECKING:
    from onnx import ModelProto

PACKING_OP_TYPES = ("RemovePadding", "PackedAttention", "RestorePadding")
# Operators that may read a packed tensor ([tokens, hidden]): the encoder's own, once fused.
_ENCODER_OP_TYPES = frozenset(
    {"PackedAttention", "SkipLayerNormalization", "MatMul", "Add", "BiasGelu", "FastGelu", "Gelu", "Cast", "RestorePadding"}
)


def check_packable(layers: Layers, precision: str) -> None:
    """Refuse what packing cannot serve, before any work is done."""
    if precision == "int8":
        raise ExportError(
            "--packed and --quantize int8 exclude each other: packed attention runs on CUDA, int8 on CPUs"
        )
    if layers != "last":
        raise ExportError(
            f"--packed needs --layers last: the head reads {layers} hidden states, which packing leaves without padding"
        )


def check_family_packable(architecture: ArchitectureSpec) -> None:
    """Packing rewrites the fused Attention of every layer: a family whose attention cannot fuse has none."""
    if architecture.not_fusable:
        raise ExportError(
            f"--packed: {architecture.model_type} cannot be packed: its attention does not fuse "
            f"({architecture.not_fusable}), and packing replaces the fused attention. "
            "Use --optimize or --fp16 (partly fused) instead"
        )


def convert_to_packed_attention(model_path: Path, num_layers: int) -> dict[str, Any]:
    """Rewrite a fused graph (one ``Attention`` per layer) in packing mode, in place; return what the manifest records."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(model_path)))
    attention = len(model.get_nodes_by_op_type("Attention"))
    if attention != num_layers:
        raise OptimizationError(f"{model_path}: packing expects the fused graph with {num_layers} Attention, found {attention}")
    converter = _encoder_packing(model)
    try:
        converter.convert(use_symbolic_shape_infer=False)
    except Exception as error:  # the converter asserts and raises many internal types
        raise OptimizationError(f"{model_path}: packing conversion failed: {type(error).__name__}: {error}") from error
    model.topological_sort()
    counts = check_packed_graph(model.model, num_layers)
    save_over(model.model, model_path)
    return {
        "tool": "onnxruntime.transformers.convert_to_packing_mode",
        "operators": counts,
        "runs_on": "CUDAExecutionProvider only",
        "attention_mask": "per-row token counts (EmbedLayerNormalization mask index): rows must be right-padded",
    }


def check_packed_graph(model: ModelProto, num_layers: int) -> dict[str, int]:
    """Raise ``OptimizationError`` unless padding is removed once, every attention is packed and only the encoder
    sees packed tensors; return the packing operator counts."""
    nodes = list(model.graph.node)
    counts = {op: sum(node.op_type == op for node in nodes) for op in PACKING_OP_TYPES}
    expected = {"RemovePadding": 1, "PackedAttention": num_layers, "RestorePadding": 1}
    left = sum(node.op_type == "Attention" for node in nodes)
    if counts != expected or left:
        raise OptimizationError(
            f"packing produced {counts} with {left} unpacked Attention left; expected {expected} and none left"
        )
    remove = next(node for node in nodes if node.op_type == "RemovePadding")
    packed = {remove.output[0]}
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    frontier = [remove.output[0]]
    while frontier:
        for node in readers.get(frontier.pop(), []):
            if node.op_type not in _ENCODER_OP_TYPES:
                raise OptimizationError(
                    f"packing left {node.op_type} node {node.name!r} reading packed (padding-free) tokens; "
                    "only the encoder may. Export without --packed, or report the checkpoint."
                )
            if node.op_type == "RestorePadding":
                continue
            for name in node.output:
                if name and name not in packed:
                    packed.add(name)
                    frontier.append(name)
    if packed & {output.name for output in model.graph.output}:
        raise OptimizationError("packing left a graph output without its padding restored")
    return counts


def _encoder_packing(model: Any) -> Any:
    """onnxruntime's ``PackingAttention``, restoring padding after the encoder's last layer norm.

    onnxruntime's converter restores it after the graph's last (Skip)LayerNormalization,
    which in a masked-LM export is the head's own layer norm, past the point where the
    head gathers the [MASK] rows; the encoder ends at its last SkipLayerNormalization.
    """
    from onnxruntime.transformers.convert_to_packing_mode import PackingAttention

    class EncoderPackingAttention(PackingAttention):  # type: ignore[misc]
        def _try_getting_last_layernorm(self) -> Any:
            encoder_norms = [node for node in self.model.nodes() if node.op_type == "SkipLayerNormalization"]
            return encoder_norms[-1] if encoder_norms else None

    return EncoderPackingAttention(model)
