"""The layer rules of ``.importlinter`` hold: worker never imports exporter, torch or transformers
(the CLI's export commands excepted), exporter reads only worker's model-directory contract, and the
layers inside worker import only downwards. ``lint-imports`` checks them; this runs it, so CI does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
CONTRACTS = sum(1 for line in CONFIG.read_text().splitlines() if line.startswith("[importlinter:contract:"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` from this interpreter's environment, over the packages under ``root``."""
    command = Path(sys.executable).with_name("lint-imports")
    assert command.is_file(), f"{command} is missing: pip install 'bertbatch[dev]' (import-linter)"
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(command), "--no-cache", "--no-logo", str(root / ".importlinter")],
        cwd=root, env=environment, capture_output=True, text=True,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in result.stdout, result.stdout


def test_a_worker_module_reaching_for_torch_or_the_exporter_breaks_the_contracts(tmp_path: Path) -> None:
    # The rules must be able to fail: a lazy import inside a function counts as much as one at the top.
    for package in ("worker", "exporter"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(CONFIG, tmp_path / ".importlinter")
    with (tmp_path / "worker" / "decode.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef _reaches_up() -> None:\n    import torch  # noqa: F401\n\n    from worker.job import run_job  # noqa: F401\n")
    with (tmp_path / "exporter" / "heads.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef _reaches_in() -> None:\n    from worker.runner import Runner  # noqa: F401\n")

    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "worker.decode -> torch" in result.stdout
    assert "worker.decode -> worker.job" in result.stdout
    assert "exporter.heads -> worker.runner" in result.stdout
