"""The benchmark's outputs: ratios, the targets from the issue, one printed table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import bucket_labels
from benchmarks.measure import Measurement, cosine_rows

PYTORCH_KINDS = ("pytorch-users", "pytorch-best", "pytorch-packed")
# The end-to-end rows/s targets on an H100, per dataset.
GPU_ROWS_PER_SECOND = {"mixed": 22_000, "fixed-128": 17_000}


@dataclass(frozen=True)
class Target:
    what: str
    wanted: float
    measured: float | None
    unit: str  # "x" (a ratio), "rows/s", "%"
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else self.measured >= self.wanted

    def line(self) -> str:
        def show(value: float) -> str:
            return f"{value * 100:.0f}%" if self.unit == "%" else f"{value:,.2f}x" if self.unit == "x" else f"{value:,.0f} {self.unit}"

        if self.measured is None:
            return f"  [n/a ] {self.what} >= {show(self.wanted)}: not measured{f' ({self.note})' if self.note else ''}"
        verdict = "met " if self.met else "MISS"
        return f"  [{verdict}] {self.what} >= {show(self.wanted)}: measured {show(self.measured)}{f' ({self.note})' if self.note else ''}"


def ok(rows: list[Measurement], dataset: str, *kinds: str) -> list[Measurement]:
    return [m for m in rows if m.dataset == dataset and m.kind in kinds and m.error is None and m.seconds > 0]


def fastest(rows: list[Measurement]) -> Measurement | None:
    return max(rows, key=lambda m: m.rows_per_second, default=None)


def ceiling_for(rows: list[Measurement], row: Measurement) -> Measurement | None:
    """The worker row's own variant's ceiling; for PyTorch rows the fastest ceiling of the same precision."""
    ceilings = ok(rows, row.dataset, "ceiling")
    if row.kind in ("worker", "ceiling"):
        return next((c for c in ceilings if c.extra.get("variant") == row.extra.get("variant")), None)
    return fastest([c for c in ceilings if c.precision == row.precision])


def add_cosines(rows: list[Measurement], reference: Measurement | None) -> None:
    """Cosine of every row's embeddings with the reference (PyTorch fp32 as users write it), row by row."""
    for row in rows:
        if reference is None or row.embeddings is None or reference.dataset != row.dataset:
            continue
        cosines = cosine_rows(reference.embeddings, row.embeddings)  # type: ignore[arg-type]
        row.extra["cosine_vs_fp32_pytorch"] = {"mean": float(cosines.mean()), "min": float(cosines.min())}


def targets(rows: list[Measurement], cuda: bool) -> list[Target]:
    mixed = "mixed"
    best = fastest(ok(rows, mixed, *PYTORCH_KINDS))
    users = next((m for m in ok(rows, mixed, "pytorch-users") if m.precision == "fp32"), None)
    workers = ok(rows, mixed, "worker")
    found: list[Target] = []

    def ratio(a: Measurement | None, b: Measurement | None) -> float | None:
        return a.rows_per_second / b.rows_per_second if a and b else None

    if not cuda:
        worker = fastest([m for m in workers if m.precision == "fp32"])
        name = worker.name if worker else "worker end to end (fp32)"
        found.append(Target(f"{name} vs best PyTorch ({best.name if best else '-'})", 1.3, ratio(worker, best), "x"))
        found.append(Target(f"{name} vs PyTorch as users write it", 4.0, ratio(worker, users), "x"))
        int8 = next((m for m in workers if m.precision == "int8"), None)
        cosine = int8.extra.get("cosine_vs_fp32_pytorch") if int8 else None
        note = f"cosine to fp32 PyTorch: mean {cosine['mean']:.5f}, min {cosine['min']:.5f}" if cosine else "no int8 export"
        found.append(Target("worker end to end (int8) vs best PyTorch", 2.0, ratio(int8, best), "x", note))
        return found
    # On GPU the targets are the fastest worker variant's (packed, fp16 or optimized: its name says which);
    # the note lists every variant, so a packed export that failed or lost is visible next to the one that won.
    worker = fastest(workers)
    name = worker.name if worker else "worker end to end"
    found.append(Target(f"{name}, mixed", GPU_ROWS_PER_SECOND[mixed], worker.rows_per_second if worker else None, "rows/s", _worker_variants(rows, mixed)))
    found.append(Target(f"{name} vs best PyTorch ({best.name if best else '-'})", 4.0, ratio(worker, best), "x"))
    ceiling = ceiling_for(rows, worker) if worker else None
    found.append(Target(f"{name} vs its ceiling", 0.85, ratio(worker, ceiling), "%"))
    fixed = [m for m in rows if m.kind == "worker" and m.dataset.startswith("fixed") and m.error is None]
    fixed_same = next((m for m in fixed if worker and m.extra.get("variant") == worker.extra.get("variant")), fastest(fixed))
    fixed_name = fixed_same.name if fixed_same else name
    found.append(Target(f"{fixed_name}, fixed-128", GPU_ROWS_PER_SECOND["fixed-128"], fixed_same.rows_per_second if fixed_same else None, "rows/s"))
    return found


def host_headroom(rows: list[Measurement], cuda: bool) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per dataset, the host pipeline's rows/s over the fastest worker's: how much faster the device side
    could get before read, tokenize, batch, decode and write hold it back; on GPU, also whether the host
    pipeline alone clears the issue's rows/s target. Returns the JSON numbers and the note lines.
    """
    numbers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for host in (m for m in rows if m.kind == "host" and m.error is None and m.seconds > 0):
        worker = fastest([m for m in ok(rows, host.dataset, "worker") if m.rows])
        headroom = host.rows_per_second / worker.rows_per_second if worker else None
        entry: dict[str, Any] = {
            "host_rows_per_second": host.rows_per_second,
            "fastest_worker": worker.name if worker else None,
            "fastest_worker_rows_per_second": worker.rows_per_second if worker else None,
            "headroom": headroom,
        }
        line = f"host pipeline headroom, {host.dataset} = host {host.rows_per_second:,.0f} rows/s / fastest worker "
        if worker and headroom is not None:
            line += f"({worker.name}) {worker.rows_per_second:,.1f} rows/s = {headroom:.2f}x"
        else:
            line += "(none ran) = -"
        target = GPU_ROWS_PER_SECOND.get(host.dataset)
        if cuda and target:
            entry["target_rows_per_second"] = target
            entry["host_clears_target"] = host.rows_per_second >= target
            line += f"; the host pipeline alone {'clears' if entry['host_clears_target'] else 'does NOT clear'} the {target:,} rows/s target"
        numbers[host.dataset] = entry
        notes.append(line)
    return numbers, notes


def _worker_variants(rows: list[Measurement], dataset: str) -> str:
    """Every worker variant's rows/s on ``dataset``, fastest first, failed ones last."""
    workers = [m for m in rows if m.kind == "worker" and m.dataset == dataset]
    ran = sorted((m for m in workers if m.error is None), key=lambda m: -m.rows_per_second)
    shown = [f"{m.extra.get('variant', m.name)} {m.rows_per_second:,.0f} rows/s" for m in ran]
    shown += [f"{m.extra.get('variant', m.name)} FAILED" for m in workers if m.error is not None]
    return "fastest worker variant of: " + ", ".join(shown) if shown else ""


def row_numbers(rows: list[Measurement], row: Measurement, peak: float) -> dict[str, Any]:
    model = row.kind != "host"  # the host row runs no model: no ratio, no FLOPs to compare
    best = fastest(ok(rows, row.dataset, *PYTORCH_KINDS)) if model else None
    ceiling = ceiling_for(rows, row) if model else None
    numbers: dict[str, Any] = {
        "kind": row.kind,
        "name": row.name,
        "dataset": row.dataset,
        "precision": row.precision,
        "rows": row.rows,
        "tokens": row.tokens,
        "seconds": row.seconds,
        "rows_per_second": row.rows_per_second,
        "tokens_per_second": row.tokens_per_second,
        "ratio_to_best_pytorch": row.rows_per_second / best.rows_per_second if best and row.error is None else None,
        "best_pytorch": best.name if best else None,
        "ratio_to_ceiling": row.rows_per_second / ceiling.rows_per_second if ceiling and row.error is None else None,
        "share_of_peak": row.useful_flops / row.seconds / peak if model and row.seconds and peak else None,
        "useful_flops": row.useful_flops,
        "bucket_tokens_per_second": {
            label: (float(tokens / seconds) if seconds > 0 else None)
            for label, tokens, seconds in zip(bucket_labels(), row.bucket_tokens, row.bucket_seconds)
        },
        "error": row.error,
        "notes": row.notes,
    }
    numbers.update(row.extra)
    return numbers


def format_table(numbers: list[dict[str, Any]]) -> str:
    header = f"{'configuration':<50} {'data':<9} {'rows':>6} {'rows/s':>9} {'tokens/s':>10} {'x best PT':>9} {'x ceil':>7} {'% peak':>7} {'cos mean/min vs fp32 PT':>24}"
    lines = [header, "-" * len(header)]
    for n in numbers:
        if n["error"]:
            lines.append(f"{n['name']:<50} {n['dataset']:<9} FAILED: {n['error']}")
            continue
        cosine = n.get("cosine_vs_fp32_pytorch")
        cosine_text = f"{cosine['mean']:.5f}/{cosine['min']:.5f}" if cosine else "-"
        peak_text = "-" if n["share_of_peak"] is None else f"{n['share_of_peak'] * 100:.1f}%"
        lines.append(
            f"{n['name']:<50} {n['dataset']:<9} {n['rows']:>6} {n['rows_per_second']:>9,.1f} {n['tokens_per_second']:>10,.0f} "
            f"{_ratio(n['ratio_to_best_pytorch']):>9} {_ratio(n['ratio_to_ceiling']):>7} "
            f"{peak_text:>7} {cosine_text:>24}"
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot(path: Path, numbers: list[dict[str, Any]], title: str) -> None:
    """Tokens/s per length bucket of the mixed set; the worker's whole-file rate as a dashed line, the host pipeline's dash-dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = bucket_labels()
    figure, axes = plt.subplots(figsize=(10, 5.5))
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    colors: dict[str, str] = {}  # a variant's worker line and its ceiling share a colour
    for n in numbers:
        if n["dataset"] != "mixed" or n["error"]:
            continue
        key = n.get("variant") or n["name"]
        color = colors.setdefault(key, next(palette))
        if n["kind"] in ("worker", "host"):
            style = "--" if n["kind"] == "worker" else "-."
            axes.axhline(n["tokens_per_second"], color=color, linestyle=style, linewidth=1.2, label=f"{n['name']} (whole file)")
            continue
        values = [n["bucket_tokens_per_second"][label] for label in labels]
        xs = [i for i, v in enumerate(values) if v]
        style = ":" if n["kind"] == "ceiling" else "-"
        axes.plot(xs, [values[i] for i in xs], color=color, marker="o", linestyle=style, label=n["name"])
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel("row length (tokens)")
    axes.set_ylabel("real tokens per second")
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
