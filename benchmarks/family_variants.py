"""The README's family x task x variant table: export every tiny family checkpoint in every variant and
record what the export did (fusions, precision, validation against PyTorch) or why it refused.

    PYTHONPATH=. python benchmarks/family_variants.py [--families roberta,mpnet] [--out family_variants.json]

The checkpoints are the tests' tiny random ones (tests/exporter/family_checkpoints.py: hidden 32,
2 layers, the family's own tokenizer kind), so the table says what each variant does to each
family's graph and how close it stays to PyTorch, not how fast a real model runs. --packed needs
CUDA to validate; without it the cell says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "exporter"))

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "optimize": {"optimize": True},
    "fp16": {"fp16": True},
    "int8": {"quantize": "int8"},
    "packed": {"packed": True},
}
TASKS = ("embed", "fill-mask", "classify")


def describe(result: Any) -> dict[str, Any]:
    report = result.report
    outputs = {name: {"max_abs": stats.max_abs, "min_cosine": stats.min_cosine} for name, stats in report.outputs.items()}
    fused = {op: n for op, n in result.manifest.optimization.get("fused", {}).items() if n}
    return {"passed": report.passed, "precision": result.manifest.precision, "fused": fused,
            "attention": result.manifest.optimization.get("attention"), "outputs": outputs}


def main() -> None:
    from family_checkpoints import FAMILIES, save_family_checkpoint

    from exporter.errors import ExportError
    from exporter.export import ExportConfig, export_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path("family_variants.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="family-variants-"))
    cells: dict[str, Any] = {}
    for family in args.families.split(","):
        for task in TASKS:
            checkpoint = save_family_checkpoint(root / f"{family}-{task}", family, task)
            for variant, options in VARIANTS.items():
                out = root / "exports" / f"{family}-{task}-{variant}"
                try:
                    cell = describe(export_model(ExportConfig(source=str(checkpoint), task=task, out=out, **options),
                                                 log=lambda line: None))
                except ExportError as error:
                    cell = {"refused": f"{type(error).__name__}: {error}"}
                cells[f"{family}/{task}/{variant}"] = cell
                print(family, task, variant, json.dumps(cell)[:200], flush=True)
    args.out.write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
