"""Writing ONNX graphs: inline, or with their weights as external data past protobuf's 2 GB limit.

A model directory holds ``model.onnx`` and, for a large graph (or when asked with
``--external-data``), every weight in one file beside it, ``model.onnx.data``
(``MODEL_DATA_FILE``). Every step that rewrites the graph (fusion, float16, int8,
packing) saves through ``save_graph``, which keeps that layout: a graph that has its
data file keeps it, a graph that outgrows 2 GB gets one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from worker.atomic import atomic_path
from worker.modeldir.manifest import MODEL_DATA_FILE

if TYPE_CHECKING:
    from onnx import ModelProto

# protobuf refuses to serialise a message of 2 GiB or more; leave room for the graph itself.
INLINE_LIMIT_BYTES = 2**31 - 2**27
# Weights smaller than this stay inline (shapes, scales): onnx's own default threshold.
_SMALL_TENSOR_BYTES = 1024


def data_file(model_path: Path) -> Path:
    return model_path.parent / MODEL_DATA_FILE


def has_external_data(model_path: Path) -> bool:
    return data_file(model_path).is_file()


def _weight_bytes(model: ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    return total


def save_graph(model: ModelProto, model_path: Path, external: bool | None = None) -> None:
    """Save ``model`` over ``model_path``; ``external`` None: external data if it already had it or is too big.

    The data file is rewritten whole (onnx appends to an existing one), after the
    whole graph is in memory; the graph file itself is replaced atomically.
    """
    import onnx

    if external is None:
        external = has_external_data(model_path) or _weight_bytes(model) >= INLINE_LIMIT_BYTES
    target = data_file(model_path)
    if not external:
        with atomic_path(model_path) as temporary:
            onnx.save_model(model, str(temporary))
        target.unlink(missing_ok=True)
        return
    target.unlink(missing_ok=True)
    with atomic_path(model_path) as temporary:
        onnx.save_model(
            model,
            str(temporary),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=MODEL_DATA_FILE,
            size_threshold=_SMALL_TENSOR_BYTES,
        )


def lay_out_export(model_path: Path, external: bool) -> bool:
    """After ``torch.onnx.export``: the graph in the directory's layout; return whether it uses external data.

    The TorchScript exporter writes a graph past 2 GB with one external file per
    tensor, named after the tensor; they are gathered into ``model.onnx.data``.
    """
    import onnx

    before = {path for path in model_path.parent.iterdir() if path != model_path}
    model = onnx.load(str(model_path))  # loads any external tensors into memory
    save_graph(model, model_path, external=external or None)
    for stray in before - {data_file(model_path)}:
        if stray.is_file():
            stray.unlink()
    return has_external_data(model_path)
