"""The model-directory manifest: what an export records and a run reads.

A model directory holds ``model.onnx``, ``tokenizer.json`` and ``bertbatch.json``
(this manifest). The exporter writes it, the worker reads it; standard library
only, so the worker reads it without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from worker.atomic import write_text_atomic

MANIFEST_NAME = "bertbatch.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The weights of a graph past protobuf's 2 GB limit, as ONNX external data beside model.onnx.
MODEL_DATA_FILE = "model.onnx.data"
FORMAT_VERSION = 1

Task = Literal["embed", "fill-mask", "classify", "token-classify"]
# classify: what turns the logits into ``probs`` (exporter/activation.py chooses it from the checkpoint).
Activation = Literal["softmax", "sigmoid", "none"]
Pooling = Literal["mean", "cls", "pooler"]
Layers = Literal["last", "second-to-last", "sum-last-four", "concat-last-four"]
Precision = Literal["fp32", "fp16", "int8"]
# padded: attention over the padded batch; packed: padding removed inside the graph
# (onnxruntime's packing mode, CUDA only). The inputs are padded batches either way.
Attention = Literal["padded", "packed"]
TASKS: tuple[Task, ...] = get_args(Task)  # the one list of tasks: the CLI, both specs and the tests read it


@dataclass(frozen=True)
class SpecialTokens:
    cls: int
    sep: int
    pad: int
    mask: int | None
    unk: int | None


@dataclass(frozen=True)
class Manifest:
    """What the worker needs to know about an exported model."""

    task: Task
    source: str
    max_length: int
    special_tokens: SpecialTokens
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    opset: int
    pooling: Pooling | None = None
    normalize: bool = False
    layers: Layers | None = None
    token_embeddings: bool = False
    embedding_dim: int | None = None
    top_k: int | None = None
    id2label: dict[int, str] | None = None
    precision: Precision = "fp32"
    optimized: bool = False
    validation: dict[str, Any] = field(default_factory=dict)
    model_file: str = MODEL_FILE
    tokenizer_file: str = TOKENIZER_FILE
    format_version: int = FORMAT_VERSION
    # What the optimizer did: fused operator counts, float16 or int8 details (exporter/optimize.py).
    optimization: dict[str, Any] = field(default_factory=dict)
    attention: Attention = "padded"
    # sentence-transformers' prompts (config_sentence_transformers.json), for `run --prompt-name`;
    # ``default_prompt_name`` applies when a run names no prompt, as in sentence-transformers.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # Pooling's ``include_prompt``: when False the prompt's tokens are left out of mean pooling,
    # and the graph has a ``pooling_mask`` input (the tokens to pool) next to the attention mask.
    include_prompt: bool = True
    # ONNX external data (the weights of a graph past 2 GB), inside the model directory; None: all in model_file.
    model_data_file: str | None = None
    # classify: the in-graph activation; None in exports made before it was recorded (softmax, no logits output).
    activation: Activation | None = None
    # token-classify: the tokenizer's continuing-subword prefix (WordPiece "##"), which tells word starts
    # from word pieces the way transformers' token-classification pipeline does; None when it has none.
    subword_prefix: str | None = None

    @property
    def multi_label(self) -> bool:
        """classify: independent per-label probabilities (a sigmoid over several labels)."""
        return self.task == "classify" and self.activation == "sigmoid" and len(self.id2label or {}) > 1

    @property
    def validated(self) -> bool:
        return bool(self.validation.get("passed"))

    @property
    def cuda_only(self) -> bool:
        """onnxruntime implements packed attention for CUDA only."""
        return self.attention == "packed"

    def to_json(self) -> str:
        data = asdict(self)
        if self.id2label is not None:
            data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {version!r}, this bertbatch reads {FORMAT_VERSION}")
        data["special_tokens"] = SpecialTokens(**data["special_tokens"])
        data["inputs"] = tuple(data["inputs"])
        data["outputs"] = tuple(data["outputs"])
        if data.get("id2label") is not None:
            data["id2label"] = {int(k): v for k, v in data["id2label"].items()}
        _check_values(data)
        return cls(**data)


def _check_values(data: dict[str, Any]) -> None:
    # A manifest edited by hand must fail here, naming the field, rather than deep inside a run.
    if data.get("task") not in TASKS:
        raise ValueError(f"task {data.get('task')!r}, expected one of {', '.join(TASKS)}")
    for name in ("max_length", "opset", "embedding_dim", "top_k"):
        value = data.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} {value!r}, expected a positive integer")
    if data["task"] == "embed" and data.get("embedding_dim") is None:
        raise ValueError("embedding_dim missing, an embed model needs it")
    for name in ("model_file", "tokenizer_file"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} {value!r}, expected a file name")


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest atomically and durably, so a crash never leaves half a file."""
    write_text_atomic(directory / MANIFEST_NAME, manifest.to_json() + "\n")


def read_manifest(directory: Path) -> Manifest:
    """Read a model directory's manifest. Raises FileNotFoundError or ValueError."""
    return Manifest.from_json((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
