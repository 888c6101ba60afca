"""Which function turns a sequence classifier's logits into its scores.

The choice follows the checkpoint, the way transformers' text-classification pipeline
(``TextClassificationPipeline.postprocess``) and sentence-transformers' ``CrossEncoder``
(``get_default_activation_fn``) make it:

- ``problem_type: multi_label_classification``: one sigmoid per label;
- one label: the sentence-transformers ``activation_fn`` when the checkpoint declares one
  (``config_sentence_transformers.json``, the ``sentence_transformers`` block of an older
  ``config.json``, or the pre-4.0 ``sbert_ce_default_activation_function``), else identity for
  ``problem_type: regression``, else sigmoid (CrossEncoder's and the pipeline's default);
- ``problem_type: regression``: identity;
- several labels: softmax, unless the sentence-transformers config declares a sigmoid (a
  multi-label cross-encoder). Its default for several labels, identity, says nothing about the
  head; the raw logits are the ``logits`` column, which is what ``CrossEncoder.predict`` returns.

Standard library only: it reads JSON files, and the CLI can check ``--activation`` early.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exporter.errors import ExportError, SourceError
from worker.modeldir.manifest import Activation

ActivationChoice = Literal["auto", "softmax", "sigmoid", "none"]
ACTIVATION_CHOICES: tuple[ActivationChoice, ...] = ("auto", "softmax", "sigmoid", "none")

# torch classes sentence-transformers stores by their dotted path (``fullname`` of the module).
_TORCH_ACTIVATIONS: dict[str, Activation] = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "none",
    "torch.nn.Identity": "none",
    "torch.nn.modules.activation.Softmax": "softmax",
    "torch.nn.Softmax": "softmax",
}


@dataclass(frozen=True)
class ActivationDecision:
    activation: Activation
    reason: str  # in words, for the export log and the manifest


def declared_activation(directories: Iterable[Path]) -> str | None:
    """The ``activation_fn`` a sentence-transformers CrossEncoder saved with the checkpoint, or ``None``.

    Looked up in the order ``CrossEncoder`` reads them: ``config_sentence_transformers.json``
    first, then ``config.json``'s ``sentence_transformers`` block, then the pre-4.0 key.
    """
    folders = list(dict.fromkeys(directories))
    for folder in folders:
        value = _json_file(folder / "config_sentence_transformers.json").get("activation_fn")
        if isinstance(value, str):
            return value
    for folder in folders:
        config = _json_file(folder / "config.json")
        block = config.get("sentence_transformers")
        if isinstance(block, dict) and isinstance(block.get("activation_fn"), str):
            return str(block["activation_fn"])
        legacy = config.get("sbert_ce_default_activation_function")
        if isinstance(legacy, str):
            return legacy
    return None


def choose_activation(
    num_labels: int,
    problem_type: str | None,
    declared: str | None,
    requested: ActivationChoice = "auto",
    source: str = "the checkpoint",
) -> ActivationDecision:
    """The activation of a classify export; ``requested`` other than ``auto`` overrides the checkpoint's."""
    if requested != "auto":
        if requested == "softmax" and num_labels == 1:
            raise ExportError(
                f"--activation softmax: {source} has a single label, and a softmax over one logit is always 1.0; "
                "use sigmoid (a probability) or none (the raw score)"
            )
        return ActivationDecision(requested, f"--activation {requested}")
    if problem_type == "multi_label_classification":
        return ActivationDecision("sigmoid", "problem_type multi_label_classification: one sigmoid per label")
    from_sentence_transformers = _torch_activation(declared, source) if declared is not None else None
    if num_labels == 1:
        if from_sentence_transformers is not None:
            if from_sentence_transformers == "softmax":
                raise SourceError(
                    f"{source}: its sentence-transformers config declares a softmax over a single label (always 1.0); "
                    "pass --activation sigmoid or none"
                )
            return ActivationDecision(from_sentence_transformers, f"sentence-transformers activation_fn {declared}")
        if problem_type == "regression":
            return ActivationDecision("none", "problem_type regression: the raw score")
        return ActivationDecision("sigmoid", "a single label: sigmoid of the logit (the pipeline's and CrossEncoder's default)")
    if problem_type == "regression":
        return ActivationDecision("none", "problem_type regression: the raw scores")
    if from_sentence_transformers == "sigmoid":
        return ActivationDecision("sigmoid", f"sentence-transformers activation_fn {declared}")
    return ActivationDecision("softmax", f"{num_labels} labels, single-label: softmax")


def _torch_activation(path: str, source: str) -> Activation:
    try:
        return _TORCH_ACTIVATIONS[path]
    except KeyError:
        known = ", ".join(sorted({p for p in _TORCH_ACTIVATIONS if p.count(".") > 2}))
        raise SourceError(
            f"{source}: its sentence-transformers config declares activation_fn {path!r}, which bertbatch cannot "
            f"put in the graph (it knows {known}); pass --activation softmax, sigmoid or none"
        ) from None


def _json_file(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: not readable JSON: {error}") from error
    return data if isinstance(data, dict) else {}
