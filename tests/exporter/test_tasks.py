"""Every registered task and architecture has its tests; the task specs are consistent."""

from __future__ import annotations

import pytest
from test_architectures import TESTED_ARCHITECTURES
from test_export import TESTED_TASKS

from exporter.architectures import ARCHITECTURES
from exporter.tasks import INPUT_NAMES, TASK_SPECS, HeadSettings, dynamic_axes
from worker.modeldir.manifest import TASKS


def test_every_task_has_an_export_test() -> None:
    untested = (set(TASK_SPECS) | set(TASKS)) - set(TESTED_TASKS)
    assert not untested, f"tasks without an export test in tests/exporter/test_export.py: {sorted(untested)}"


def test_task_specs_and_manifest_tasks_agree() -> None:
    assert set(TASK_SPECS) == set(TASKS)
    for name, spec in TASK_SPECS.items():
        assert spec.task == name


def test_every_architecture_has_a_test() -> None:
    untested = set(ARCHITECTURES) - set(TESTED_ARCHITECTURES)
    assert not untested, f"architectures without a test in tests/exporter/test_architectures.py: {sorted(untested)}"


@pytest.mark.parametrize("task", TESTED_TASKS)
@pytest.mark.parametrize("token_embeddings", [False, True])
def test_every_output_has_dynamic_axes(task: str, token_embeddings: bool) -> None:
    spec = TASK_SPECS[task]  # type: ignore[index]
    settings = HeadSettings(token_embeddings=token_embeddings)
    axes = dynamic_axes(spec, settings)

    assert set(axes) == set(INPUT_NAMES) | set(spec.output_names(settings))
    for name in INPUT_NAMES:
        assert axes[name] == {0: "batch", 1: "sequence"}
    for name in spec.output_names(settings):
        assert 0 in axes[name], f"{task}: output {name!r} has a fixed first axis"
