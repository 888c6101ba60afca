"""Validation of an ONNX export against the PyTorch model it came from.

The inputs look like real batches: rows of different lengths right-padded together,
batch size 1, several batch sizes and lengths up to the maximum, sentence pairs
with ``token_type_ids``, and (fill-mask) rows with and without ``[MASK]``.
Only valid (unpadded) positions are compared. Tolerances are explicit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from exporter.comparisons import CaseOutputs, OutputStats
from exporter.errors import DeviceRequired
from exporter.tasks import TASK_SPECS
from worker.modeldir.manifest import Precision, Task
from worker.modeldir.padding import pad_rows
from worker.modeldir.session import CUDA, create_session, cuda_unavailable_reason, provider_of

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import nn

ValidationDevice = Literal["cpu", "cuda"]
# Where the ONNX side runs. On CUDA, TF32 is switched off (onnxruntime enables it by
# default), so float32 matmuls are float32 and the fp32 criteria keep their meaning.
_ONNX_RUNTIME = {
    "cpu": "onnxruntime CPUExecutionProvider",
    "cuda": "onnxruntime CUDAExecutionProvider, TF32 off",
}

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "i love kathmandu",
    "Sinan loves a beautiful day",
    "Offline batch inference turns GPU time into rows.",
    "Zürich, Malmö and São Paulo are cities; 東京 is one too.",
    "A",
    "",
    "Parquet files hold columns, and row groups hold a few thousand rows each, compressed with zstd or snappy.",
    "Why does the model predict this label? Because the training data said so, mostly.",
    "emoji 🚀 and numbers 3.14159 and e-mail someone@example.com",
)
SAMPLE_PAIRS = (
    ("What is the capital of Nepal?", "Kathmandu is the capital of Nepal."),
    ("Is it raining?", "No."),
    ("How are embeddings pooled?", "By averaging the token vectors of the real tokens, ignoring padding."),
    ("short", "a much longer second segment that goes on for a while to make the pair uneven in length"),
)


@dataclass(frozen=True)
class Tolerances:
    """How close the ONNX outputs must be to PyTorch's.

    ``atol``/``rtol`` apply element-wise (numpy ``allclose``). When ``min_cosine`` is
    set (reduced precision), vectors are compared by cosine similarity instead, each
    vector at least ``min_cosine`` and, when ``min_mean_cosine`` is set, the pooled
    embeddings' mean over all cases at least that; probabilities by ``atol`` plus the
    same top-1 choice except near-ties. ``default_tolerances`` gives each precision's defaults.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float | None = None
    min_mean_cosine: float | None = None

    def describe(self) -> str:
        """The pass rule in words, for the manifest and the report."""
        if self.min_cosine is None:
            return (f"every output element within atol {self.atol:g} + rtol {self.rtol:g} x |PyTorch|; "
                    "mask_positions exact; top_ids equal except ties within the same tolerance")
        mean = "" if self.min_mean_cosine is None else f", and the embeddings' mean over all cases >= {self.min_mean_cosine:g}"
        return (f"embedding/token_embeddings: cosine with PyTorch >= {self.min_cosine:g} for every vector{mean}; "
                f"probs/token_probs/logits: within atol {self.atol:g} x max(1, the row's largest |PyTorch score|) "
                f"and the same top-1 label unless PyTorch's top two are within twice that; top_scores within atol {self.atol:g} + rtol {self.rtol:g} x |PyTorch|; "
                "top_ids equal except ties within atol; mask_positions exact")


# Reduced precision cannot match float32 element-wise, so it is held to explicit,
# different criteria; flags loosen them further, nothing else does.
DEFAULT_TOLERANCES: dict[Precision, Tolerances] = {
    # Fused float32 kernels only reorder sums (differences ~1e-6): the strict defaults hold.
    "fp32": Tolerances(),
    "fp16": Tolerances(atol=1e-2, rtol=0.0, min_cosine=0.999),
    # Dynamic int8 loses agreement, boundedly: all-MiniLM-L6-v2 measures a mean cosine
    # about 0.992 over the validation cases, its worst vector about 0.977.
    "int8": Tolerances(atol=5e-2, rtol=0.0, min_cosine=0.9, min_mean_cosine=0.99),
}


def default_tolerances(precision: Precision) -> Tolerances:
    return DEFAULT_TOLERANCES[precision]


@dataclass(frozen=True)
class ValidationCase:
    name: str
    inputs: dict[str, np.ndarray]


@dataclass
class ValidationReport:
    passed: bool
    tolerances: Tolerances
    cases: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, OutputStats] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    device: ValidationDevice = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerances": asdict(self.tolerances),
            "criteria": self.tolerances.describe(),
            "reference": "PyTorch fp32 on CPU",
            "onnx": _ONNX_RUNTIME[self.device],
            "cases": self.cases,
            "outputs": {name: asdict(stats) for name, stats in self.outputs.items()},
            "problems": self.problems,
        }

    def summary_lines(self) -> list[str]:
        lines = [f"validation against PyTorch: {'PASSED' if self.passed else 'FAILED'} ({len(self.cases)} cases, "
                 f"{_ONNX_RUNTIME[self.device]})"]
        for name, stats in self.outputs.items():
            cosine = "" if stats.min_cosine is None else f"  min cosine {stats.min_cosine:.6f}"
            if stats.mean_cosine is not None:
                cosine += f"  mean cosine {stats.mean_cosine:.6f} over {stats.vectors} vectors"
            lines.append(f"  {name:<17} max abs diff {stats.max_abs:.3e}  max rel diff {stats.max_rel:.3e}{cosine}")
        lines.extend(f"  problem: {problem}" for problem in self.problems[:10])
        return lines


POOLING_MASK = "pooling_mask"


def prompt_pooling_mask(attention_mask: np.ndarray, prompt_positions: int = 3) -> np.ndarray:
    """A pooling mask as the worker makes it for a prompt: the attention mask less the first positions.

    Only in rows with tokens left to pool: an all-zero mask pools a zero vector, which has no
    cosine to compare (the int8 and fp16 criteria would fail on it whatever the graph computes).
    """
    pooling_mask = attention_mask.copy()
    longer = attention_mask.sum(axis=1) > prompt_positions + 1
    pooling_mask[longer, :prompt_positions] = 0
    return pooling_mask


def build_cases(tokenizer: Tokenizer, task: Task, max_length: int, mask_token_id: int | None, pad_id: int) -> list[ValidationCase]:
    """Real-looking batches; padding differs between rows of a batch on purpose."""
    masked = TASK_SPECS[task].masked_inputs
    tokenizer.enable_truncation(max_length)
    try:
        singles = [tokenizer.encode(text) for text in SAMPLE_TEXTS]
        pairs = [tokenizer.encode(a, b) for a, b in SAMPLE_PAIRS]
        long_text = " ".join(SAMPLE_TEXTS * (max_length // 8 + 1))
        longest = tokenizer.encode(long_text)
        near_max = tokenizer.encode(" ".join(long_text.split()[: max(1, max_length // 2)]))
    finally:
        tokenizer.no_truncation()

    def make(name: str, encodings: list[Any]) -> ValidationCase:
        rows = [list(e.ids) for e in encodings]
        types = [list(e.type_ids) for e in encodings]
        if masked and mask_token_id is not None and not name.startswith("no-mask"):
            rows = [_with_masks(row, mask_token_id) for row in rows]
        input_ids, attention_mask, token_type_ids = pad_rows(rows, types, pad_id)
        return ValidationCase(name, {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids})

    cases = [
        make("padded-batch", singles),
        make("batch-1", [singles[0]]),
        make("batch-1-empty-text", [singles[6]]),
        make("batch-3", singles[7:10]),
        make("near-max-length", [longest, singles[1]]),
        make("long-and-mid", [near_max, longest, singles[3], singles[5]]),
        make("sentence-pairs", pairs),
    ]
    if masked:
        cases.append(make("no-mask-batch-1", [singles[2]]))
    return cases


def _with_masks(row: list[int], mask_token_id: int) -> list[int]:
    # Mask the first word and one in the middle; keep [CLS]/[SEP] at the ends.
    masked = list(row)
    for position in {1, len(row) // 2}:
        if 0 < position < len(row) - 1:
            masked[position] = mask_token_id
    return masked


def reference_outputs(
    head: nn.Module, case: ValidationCase, input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
) -> list[np.ndarray]:
    """PyTorch's outputs, fed the same inputs as the graph (``token_type_ids`` only where it takes them)."""
    import torch

    if head.training or any(module.training for module in head.modules()):
        raise RuntimeError("the PyTorch reference is in training mode (dropout on); call .eval() first")
    with torch.inference_mode():
        outputs = head(**{name: torch.from_numpy(case.inputs[name]) for name in input_names})
    return [output.float().numpy() if output.is_floating_point() else output.numpy() for output in outputs]


def compare_case(
    task: Task,
    case: ValidationCase,
    output_names: tuple[str, ...],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    tolerances: Tolerances,
) -> tuple[dict[str, OutputStats], list[str]]:
    """Compare one case output by output, each with the comparison its task's spec names for it."""
    comparisons = TASK_SPECS[task].comparisons
    stats: dict[str, OutputStats] = {}
    problems: list[str] = []
    outputs = CaseOutputs(case.inputs["attention_mask"], dict(zip(output_names, zip(reference, candidate))))
    for name, (expected, got) in outputs.pairs.items():
        if expected.shape != got.shape:
            problems.append(f"{case.name}: output {name!r} has shape {got.shape}, PyTorch gives {expected.shape}")
            stats[name] = OutputStats(mismatches=1)
            continue
        stats[name] = comparisons[name](expected, got, outputs, tolerances)
        if stats[name].mismatches:
            problems.append(f"{case.name}: output {name!r} differs from PyTorch at {stats[name].mismatches} place(s) "
                            f"(max abs diff {stats[name].max_abs:.3e})")
    return stats, problems


def validate_onnx(
    head: nn.Module,
    onnx_path: Path,
    task: Task,
    output_names: tuple[str, ...],
    cases: list[ValidationCase],
    tolerances: Tolerances,
    device: ValidationDevice = "cpu",
) -> ValidationReport:
    """Run every case through PyTorch (float32, CPU) and onnxruntime (on ``device``) and compare."""
    session = validation_session(onnx_path, device)
    input_names = tuple(graph_input.name for graph_input in session.get_inputs())
    report = ValidationReport(passed=True, tolerances=tolerances, device=device)
    for case in cases:
        if POOLING_MASK in input_names and POOLING_MASK not in case.inputs:
            case = ValidationCase(case.name, {**case.inputs, POOLING_MASK: prompt_pooling_mask(case.inputs["attention_mask"])})
        reference = reference_outputs(head, case, input_names)
        candidate = session.run(list(output_names), {name: case.inputs[name] for name in input_names})
        stats, problems = compare_case(task, case, output_names, reference, candidate, tolerances)
        report.cases.append({"name": case.name, "shape": list(case.inputs["input_ids"].shape), "passed": not problems})
        for name, output_stats in stats.items():
            report.outputs.setdefault(name, OutputStats()).merge(output_stats)
        report.problems.extend(problems)
    report.problems.extend(mean_cosine_problems(report.outputs, tolerances))
    report.passed = not report.problems
    return report


def validation_session(onnx_path: Path, device: ValidationDevice) -> Any:
    """An onnxruntime session on exactly ``device``; raises ``DeviceRequired`` when CUDA is asked for and missing."""
    if device == "cpu":
        return create_session(onnx_path, "cpu")
    reason = cuda_unavailable_reason()
    if reason:
        raise DeviceRequired(f"{onnx_path}: validating on CUDA needs a working GPU; {reason}")
    session = create_session(onnx_path, "cuda", cuda_options={"use_tf32": "0"})
    if provider_of(session) != CUDA:
        raise DeviceRequired(f"{onnx_path}: onnxruntime could not initialise CUDA (no GPU, driver or CUDA libraries)")
    return session


def mean_cosine_problems(outputs: dict[str, OutputStats], tolerances: Tolerances) -> list[str]:
    """The bound on the average agreement of the pooled embeddings, which only all cases together can check.

    Per-token vectors (``token_embeddings``) are noisier than their mean: their mean
    cosine is reported, and each is held to ``min_cosine``.
    """
    stats = outputs.get("embedding")
    if tolerances.min_mean_cosine is None or stats is None or stats.mean_cosine is None:
        return []
    if stats.mean_cosine >= tolerances.min_mean_cosine:
        return []
    return [f"output 'embedding': mean cosine with PyTorch {stats.mean_cosine:.6f} over {stats.vectors} vectors "
            f"is below {tolerances.min_mean_cosine:g} (worst vector {stats.min_cosine:.6f})"]
