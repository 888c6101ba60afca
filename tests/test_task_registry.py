"""A task is one spec on each side: the exporter's (``exporter/tasks.py``) and the worker's decoder
(``worker/decode.py``). Adding a task to ``Task`` without both, or without their tests, fails here."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from exporter.tasks import TASK_SPECS, HeadSettings
from worker.cli import export as export_command
from worker.decode import DECODERS
from worker.modeldir.manifest import TASKS, Task

TESTS = Path(__file__).parent
# Where each side keeps the list of tasks its tests cover, and the name of that list.
TESTED_IN = {
    "exporter/test_export.py": "TESTED_TASKS",
    "worker/test_decode.py": "TESTED_DECODERS",
    "test_cli.py": "TASK_CASES",
}


def tasks_listed(test_file: str, name: str) -> set[str]:
    """The tasks a test module lists in its module-level ``name`` (a tuple, or a dict keyed by task)."""
    tree = ast.parse((TESTS / test_file).read_text(encoding="utf-8"))
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(target, ast.Name) and target.id == name for target in targets) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Dict):
                return {ast.literal_eval(key) for key in value.keys if key is not None}
            return set(ast.literal_eval(value))
    raise AssertionError(f"tests/{test_file} has no module-level {name}")


def test_every_task_has_a_spec_on_each_side() -> None:
    assert set(TASK_SPECS) == set(TASKS), f"tasks without an exporter spec: {set(TASKS) - set(TASK_SPECS)}"
    assert set(DECODERS) == set(TASKS), f"tasks without a worker decoder: {set(TASKS) - set(DECODERS)}"
    for task in TASKS:
        assert TASK_SPECS[task].task == task and DECODERS[task].task == task


@pytest.mark.parametrize("test_file", list(TESTED_IN))
def test_every_task_is_tested_on_each_side_and_through_the_cli(test_file: str) -> None:
    untested = set(TASKS) - tasks_listed(test_file, TESTED_IN[test_file])
    assert not untested, f"tasks without a test in tests/{test_file}: {sorted(untested)}"


def test_the_cli_offers_exactly_the_registered_tasks() -> None:
    hints = typing.get_type_hints(export_command, include_extras=True)
    assert typing.get_args(typing.get_args(hints["task"])[0]) == TASKS


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("token_embeddings", [False, True])
def test_every_output_has_axes_and_a_comparison(task: Task, token_embeddings: bool) -> None:
    spec = TASK_SPECS[task]
    for name in spec.output_names(HeadSettings(token_embeddings=token_embeddings)):
        assert name in spec.output_axes, f"{task}: output {name!r} has no dynamic axes"
        assert name in spec.comparisons, f"{task}: output {name!r} is not validated (no comparison in its spec)"
