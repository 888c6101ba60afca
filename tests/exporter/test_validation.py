"""Validation must catch a broken export: a graph whose attention mask is frozen to ones
(padding leaks into every padded row), compared output by output at valid positions only."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from exporter.errors import ExportError, ValidationMismatch
import exporter.export
from exporter.export import ExportConfig, ExportResult, export_model, revalidate, trace_to_onnx
from exporter.source import load_model, load_tokenizer, resolve_source
from exporter.tasks import TASK_SPECS, HeadSettings
from exporter.validation import Tolerances, ValidationCase, build_cases, compare_case, validate_onnx
from worker.exit_codes import ExitCode
from worker.modeldir.manifest import MODEL_FILE, Task, read_manifest

EMBED_OUTPUTS = ("embedding",)
FILL_MASK_OUTPUTS = ("mask_positions", "top_scores", "top_ids")
# Per task: a checkpoint whose outputs depend on the input beyond the tolerances, and the
# output a frozen mask must show up in. (The default tiny fill-mask and classify heads are
# too flat: a frozen mask stays within the tolerances there.)
BROKEN_EXPORTS: dict[str, tuple[str, str]] = {
    "embed": ("tiny_base_checkpoint", "embedding"),
    "fill-mask": ("tiny_decisive_mlm_checkpoint", "top_scores"),
    "classify": ("tiny_decisive_classifier_checkpoint", "probs"),
    "token-classify": ("tiny_token_classifier_checkpoint", "token_probs"),
}


class FrozenMask(nn.Module):
    """A broken head around a real one: it replaces the attention mask by ones."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self.head(input_ids, torch.ones_like(attention_mask), token_type_ids)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class FrozenExport:
    task: Task
    head: nn.Module  # the real one
    onnx_path: Path  # traced from FrozenMask(head)
    output_names: tuple[str, ...]
    cases: list[ValidationCase]


def export_frozen(checkpoint: Path, task: Task, directory: Path) -> FrozenExport:
    resolved = resolve_source(str(checkpoint))
    model, architecture = load_model(resolved, task)
    tokenizer = load_tokenizer(resolved)
    settings = HeadSettings(mask_token_id=tokenizer.token_to_id("[MASK]"))
    spec = TASK_SPECS[task]
    head = spec.build_head(model, architecture, settings)
    output_names = spec.output_names(settings)
    onnx_path = directory / MODEL_FILE
    trace_to_onnx(FrozenMask(head), settings, task, onnx_path, output_names, 17, 0)
    cases = build_cases(tokenizer, task, 128, settings.mask_token_id, 0)
    return FrozenExport(task, head, onnx_path, output_names, cases)


def validate_frozen(frozen: FrozenExport, head: nn.Module) -> Any:
    return validate_onnx(head, frozen.onnx_path, frozen.task, frozen.output_names, frozen.cases, Tolerances())


@pytest.fixture(scope="module")
def frozen_embed_export(tmp_path_factory: pytest.TempPathFactory, tiny_base_checkpoint: Path) -> FrozenExport:
    return export_frozen(tiny_base_checkpoint, "embed", tmp_path_factory.mktemp("frozen-mask"))


# --- validate_onnx on a broken graph --------------------------------------------------------------


@pytest.mark.parametrize("task", list(BROKEN_EXPORTS))
def test_validation_catches_a_frozen_attention_mask(task: Task, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    checkpoint_fixture, broken_output = BROKEN_EXPORTS[task]
    if task == "embed":
        frozen: FrozenExport = request.getfixturevalue("frozen_embed_export")
    else:
        frozen = export_frozen(request.getfixturevalue(checkpoint_fixture), task, tmp_path)

    report = validate_frozen(frozen, frozen.head)

    assert report.passed is False
    passed_by_case = {case["name"]: case["passed"] for case in report.cases}
    assert passed_by_case["padded-batch"] is False
    assert passed_by_case["sentence-pairs"] is False
    # A single row has no padding, so a frozen mask changes nothing there.
    assert passed_by_case["batch-1"] is True
    expected_problem = f"padded-batch: output {broken_output!r} differs from PyTorch"
    assert any(problem.startswith(expected_problem) for problem in report.problems), report.problems
    assert report.outputs[broken_output].mismatches > 0
    assert report.to_dict()["passed"] is False
    assert "FAILED" in report.summary_lines()[0]
    # The same graph matches the broken head it came from: the failure is the mask, not the harness.
    assert validate_frozen(frozen, FrozenMask(frozen.head)).passed


def test_validation_refuses_a_reference_in_training_mode(
    frozen_embed_export: FrozenExport, tiny_base_checkpoint: Path
) -> None:
    # A model of its own: the shared one stays in eval mode whatever happens here.
    model, architecture = load_model(resolve_source(str(tiny_base_checkpoint)), "embed")
    head = FrozenMask(TASK_SPECS["embed"].build_head(model, architecture, HeadSettings()))

    head.train()
    with pytest.raises(RuntimeError, match="training mode"):
        validate_frozen(frozen_embed_export, head)
    head.eval()
    assert validate_frozen(frozen_embed_export, head).passed
    model.encoder.layer[0].train()  # dropout on in one submodule is enough to refuse
    with pytest.raises(RuntimeError, match="training mode"):
        validate_frozen(frozen_embed_export, head)


def test_build_cases_pad_rows_of_different_lengths(tiny_base_checkpoint: Path) -> None:
    tokenizer = load_tokenizer(resolve_source(str(tiny_base_checkpoint)))
    cases = {case.name: case for case in build_cases(tokenizer, "fill-mask", 128, 103, 0)}

    lengths = cases["padded-batch"].inputs["attention_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) > 2
    assert cases["near-max-length"].inputs["input_ids"].shape[1] == 128
    assert cases["sentence-pairs"].inputs["token_type_ids"].any()
    assert (cases["padded-batch"].inputs["input_ids"] == 103).any()
    assert not (cases["no-mask-batch-1"].inputs["input_ids"] == 103).any()
    for case in cases.values():
        padded = case.inputs["attention_mask"] == 0
        assert (case.inputs["input_ids"][padded] == 0).all(), case.name
    assert tokenizer.truncation is None, "build_cases leaves the tokenizer as it found it"


# --- compare_case ---------------------------------------------------------------------------------


def a_case(attention_mask: list[list[int]]) -> ValidationCase:
    mask = np.array(attention_mask, dtype=np.int64)
    ids = np.where(mask == 1, 2000, 0).astype(np.int64)
    return ValidationCase("unit-case", {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)})


def compare_fill_mask(
    expected: tuple[list[list[float]], list[list[int]]], got: tuple[list[list[float]], list[list[int]]]
) -> tuple[dict[str, Any], list[str]]:
    positions = np.array([[0, 1]], dtype=np.int64)
    reference: list[np.ndarray] = [positions, np.array(expected[0], dtype=np.float32), np.array(expected[1], dtype=np.int64)]
    candidate: list[np.ndarray] = [positions, np.array(got[0], dtype=np.float32), np.array(got[1], dtype=np.int64)]
    return compare_case("fill-mask", a_case([[1, 1, 1]]), FILL_MASK_OUTPUTS, reference, candidate, Tolerances())


def test_compare_case_accepts_ids_swapped_within_a_near_tie() -> None:
    stats, problems = compare_fill_mask(
        ([[0.5, 0.2, 0.2]], [[7, 3, 9]]),
        ([[0.5, 0.2, 0.20001]], [[7, 9, 3]]),
    )
    assert problems == []
    assert stats["top_ids"].mismatches == 0


def test_compare_case_accepts_a_tie_across_the_top_k_cut() -> None:
    # Token 11 ties token 9 at the k-th place; which one makes the cut is a coin toss.
    _, problems = compare_fill_mask(([[0.5, 0.3, 0.1]], [[7, 3, 9]]), ([[0.5, 0.3, 0.1]], [[7, 3, 11]]))
    assert problems == []


def test_compare_case_rejects_a_different_id_with_a_different_score() -> None:
    stats, problems = compare_fill_mask(([[0.5, 0.3, 0.1]], [[7, 3, 9]]), ([[0.45, 0.3, 0.1]], [[8, 3, 9]]))
    assert stats["top_ids"].mismatches == 1
    assert stats["top_scores"].mismatches == 1
    assert any("unit-case: output 'top_ids'" in problem for problem in problems), problems


def test_compare_case_rejects_wrong_ids_even_when_the_scores_agree() -> None:
    # An id-mapping bug (every id off by one) keeps the scores right: it must still fail.
    stats, problems = compare_fill_mask(([[0.5, 0.3, 0.1]], [[7, 3, 9]]), ([[0.5, 0.3, 0.1]], [[8, 4, 10]]))
    assert stats["top_ids"].mismatches == 2  # the last place ties the cut, so only two count
    assert stats["top_scores"].mismatches == 0
    assert problems == ["unit-case: output 'top_ids' differs from PyTorch at 2 place(s) (max abs diff 0.000e+00)"]


def test_compare_case_rejects_different_mask_positions() -> None:
    reference = [np.array([[0, 1]]), np.array([[0.5]], dtype=np.float32), np.array([[7]])]
    candidate = [np.array([[0, 2]]), np.array([[0.5]], dtype=np.float32), np.array([[7]])]
    stats, problems = compare_case("fill-mask", a_case([[1, 1, 1]]), FILL_MASK_OUTPUTS, reference, candidate, Tolerances())
    assert stats["mask_positions"].mismatches == 1
    assert problems and "'mask_positions'" in problems[0]


def test_compare_case_compares_token_embeddings_at_valid_positions_only() -> None:
    case = a_case([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    names = ("embedding", "token_embeddings")
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(2, 4)).astype(np.float32)
    tokens = rng.normal(size=(2, 5, 4)).astype(np.float32)
    garbage = tokens.copy()
    garbage[0, 3:] = 1e6  # whatever a graph leaves at padded positions is never read

    stats, problems = compare_case("embed", case, names, [pooled, tokens], [pooled, garbage], Tolerances())
    assert problems == []
    assert stats["token_embeddings"].max_abs == 0.0

    wrong = garbage.copy()
    wrong[0, 2] += 0.5  # the last real token of the first row
    stats, problems = compare_case("embed", case, names, [pooled, tokens], [pooled, wrong], Tolerances())
    assert stats["token_embeddings"].mismatches == 4
    assert problems and problems[0].startswith("unit-case: output 'token_embeddings'")


def test_compare_case_applies_the_tolerances() -> None:
    case = a_case([[1, 1]])
    expected = np.array([[1.0, -2.0, 3.0]], dtype=np.float32)

    _, close = compare_case("embed", case, EMBED_OUTPUTS, [expected], [expected + 5e-5], Tolerances())
    assert close == []
    _, far = compare_case("embed", case, EMBED_OUTPUTS, [expected], [expected + 5e-3], Tolerances())
    assert len(far) == 1
    _, loosened = compare_case("embed", case, EMBED_OUTPUTS, [expected], [expected + 5e-3], Tolerances(atol=1e-2))
    assert loosened == []


def test_compare_case_rejects_nan_and_wrong_shapes() -> None:
    case = a_case([[1, 1]])
    expected = np.array([[1.0, 2.0]], dtype=np.float32)

    stats, problems = compare_case("embed", case, EMBED_OUTPUTS, [expected], [np.array([[1.0, np.nan]], dtype=np.float32)], Tolerances())
    assert stats["embedding"].mismatches == 1 and problems
    _, problems = compare_case("embed", case, EMBED_OUTPUTS, [expected], [expected[:, :1]], Tolerances())
    assert problems == ["unit-case: output 'embedding' has shape (1, 1), PyTorch gives (1, 2)"]


# --- export_model and revalidate end to end -------------------------------------------------------


def test_a_failed_export_is_kept_aside_and_never_becomes_the_output(
    tmp_path: Path, tiny_base_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_trace = exporter.export.trace_to_onnx

    def trace_with_frozen_mask(head: nn.Module, *args: Any, **kwargs: Any) -> None:
        real_trace(FrozenMask(head), *args, **kwargs)

    monkeypatch.setattr(exporter.export, "trace_to_onnx", trace_with_frozen_mask)
    out = tmp_path / "model"

    with pytest.raises(ValidationMismatch, match="padded-batch: output 'embedding'") as raised:
        export_model(ExportConfig(source=str(tiny_base_checkpoint), task="embed", out=out), log=lambda line: None)

    failed = tmp_path / "model.failed"
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.failed"]
    assert str(failed) in str(raised.value)
    assert raised.value.exit_code == ExitCode.VALIDATION_FAILED
    manifest = read_manifest(failed)
    assert manifest.validation["passed"] is False
    assert not manifest.validated
    assert any("padded-batch" in problem for problem in manifest.validation["problems"])
    assert (failed / MODEL_FILE).is_file()


@pytest.mark.parametrize("task", ["embed", "fill-mask", "classify", "token-classify"])
def test_revalidate_passes_on_a_good_export(task: str, request: pytest.FixtureRequest) -> None:
    result: ExportResult = request.getfixturevalue(
        {
            "embed": "tiny_embed_export",
            "fill-mask": "tiny_fill_mask_export",
            "classify": "tiny_classify_export",
            "token-classify": "tiny_token_classify_export",
        }[task]
    )
    lines: list[str] = []
    report = revalidate(result.directory, log=lines.append)
    assert report.passed
    assert len(report.cases) == len(result.report.cases)
    assert lines[0].startswith("validation against PyTorch: PASSED")


def test_revalidate_catches_a_replaced_model(
    tmp_path: Path, tiny_embed_export: ExportResult, frozen_embed_export: FrozenExport
) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_embed_export.directory, directory)
    shutil.copyfile(frozen_embed_export.onnx_path, directory / MODEL_FILE)

    with pytest.raises(ValidationMismatch, match="padded-batch: output 'embedding'"):
        revalidate(directory, log=lambda line: None)


def test_revalidate_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a bertbatch model directory"):
        revalidate(tmp_path, log=lambda line: None)
