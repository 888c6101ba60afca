"""Job paths confined to allowed roots: a queued job reads and writes only under ``--allow-root`` directories.

Anyone who can write to the queue can name paths, so both ``submit`` and ``serve``
check them. Paths are resolved (symlinks followed, ``..`` removed) before the
check, and every input file a directory or glob expands to is checked on its own.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from worker.config import RunConfig, with_absolute_paths
from worker.errors import PathNotAllowed, UsageError
from worker.runner import open_model_dir
from worker.source import resolve_inputs

__all__ = ["check_confined", "with_absolute_paths"]


def check_confined(config: RunConfig, roots: Sequence[Path]) -> None:
    """Raise ``PathNotAllowed`` unless the model directory, every input file and the output lie under a root."""
    if not roots:
        raise UsageError("no --allow-root given: name the directories queued jobs may read and write (e.g. --allow-root /data)")
    resolved_roots = [root.expanduser().resolve() for root in roots]
    _check_path("--model", config.model_dir, resolved_roots)
    _check_path("--output", config.output, resolved_roots)
    if config.calibration is not None:
        _check_path("--calibration", config.calibration, resolved_roots)
    # The pattern's fixed part first, so nothing outside the roots is even listed.
    _check_path("--input", _pattern_base(config.input), resolved_roots)
    for path in resolve_inputs(config.input):
        _check_path("--input", path, resolved_roots)
    model_dir = open_model_dir(config.model_dir)
    for path in (*model_dir.model_files, model_dir.tokenizer_file):
        _check_path("--model", path, resolved_roots)


def _check_path(option: str, path: Path, roots: list[Path]) -> None:
    resolved = path.expanduser().resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathNotAllowed(
            f"{option} {path}: resolves to {resolved}, outside the allowed roots ({', '.join(map(str, roots))}); "
            "move it under an allowed root, or allow its directory with --allow-root"
        )


def _pattern_base(pattern: str) -> Path:
    """The leading part of a glob without wildcards (the whole path when it has none)."""
    fixed: list[str] = []
    for part in Path(pattern).expanduser().parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
