"""Throughput benchmark: the worker end to end vs PyTorch baselines vs the model-only ceiling.

    python benchmarks/bench.py --arch bert-base            # random-weight BERT-base, no download
    python benchmarks/bench.py --arch minilm --rows 1000   # the packaged all-MiniLM-L6-v2
    python benchmarks/bench.py --model models/my-export    # any export; PyTorch loads its manifest's source

Every configuration runs in this one process on the same generated rows: a log-normal
length mix (mean ~82 tokens, p99 ~381, cap 512) and a set of 128-token rows. Prints one
table and the issue's targets, and writes ``<out>/bench-<device>-<model>.json`` (every
number) and ``.png`` (throughput by length bucket). GPU rows run only where both
PyTorch and onnxruntime see CUDA.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import budget, data, models, report
from benchmarks.measure import Kind, Measurement, measure_peak_flops

DEFAULT_ROWS = {"cpu": 2000, "cuda": 20000}
DEFAULT_VARIANTS = {"cpu": "fp32,optimized,int8", "cuda": "optimized,fp16"}
DEFAULT_BUDGET_SECONDS = {"cpu": 240.0, "cuda": 0.0}
# How a time budget is shared: the mixed set carries the targets, the fixed set is a check on one shape.
BUDGET_SHARES = {"mixed": 0.7, "fixed-128": 0.3}
CONFIGS = ("users", "best", "packed", "worker", "ceiling")
FLOPS_FORMULA = "FLOPs per row of n real tokens = n * (2 * P + 4 * L * n * H); P = non-embedding parameters, L layers, H hidden"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=("bert-base", "minilm"), help="build/export this model (default: bert-base)")
    source.add_argument("--model", type=Path, help="an exported model directory, benchmarked as it is")
    parser.add_argument("--rows", type=int, help="rows per dataset (default 2000 on CPU, 20000 on GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--variants", help="ONNX variants for --arch, of fp32,optimized,int8,fp16 (default CPU: fp32,optimized,int8; GPU: optimized,fp16)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"which configurations to run, of {','.join(CONFIGS)} (default all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the JSON, the PNG and cached exports go")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch for the worker, the best PyTorch and the ceiling (default: the worker's 64)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per batch for the same (default: the worker's 16384)")
    parser.add_argument("--threads", type=int, help="intra-op threads for onnxruntime and torch (default: their own)")
    parser.add_argument("--max-seconds", type=float, help="measurement time budget; rows are cut (for every configuration alike) to fit (default 240 on CPU, none on GPU; 0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG (no matplotlib needed)")
    arguments = parser.parse_args(argv)
    if arguments.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the plot needs matplotlib: pip install 'bertbatch[bench]' (or pass --no-plot)")
    if arguments.model and arguments.variants:
        parser.error("--variants applies to --arch; --model DIR benchmarks that export as it is")
    unknown = set(arguments.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    return arguments


def resolve_device(wanted: str) -> str:
    """CUDA only when both PyTorch and onnxruntime can use it."""
    import onnxruntime
    import torch

    from worker.runner import CUDA

    cuda = torch.cuda.is_available() and CUDA in onnxruntime.get_available_providers()
    if wanted == "cuda" and not cuda:
        raise SystemExit("--device cuda: PyTorch or onnxruntime sees no CUDA device here; use --device cpu or auto")
    return "cuda" if cuda and wanted != "cpu" else "cpu"


def prepare_models(arguments: argparse.Namespace, device: str, log: Callable[[str], None]) -> tuple[Path, dict[str, object], list[str], str]:
    """The PyTorch checkpoint, the ONNX variants (name -> ModelDir, or the error that stopped its export), notes."""
    from exporter.errors import ExportError
    from exporter.source import resolve_source
    from worker.runner import open_model_dir

    notes: list[str] = []
    if arguments.model:
        model_dir = open_model_dir(arguments.model)
        checkpoint = resolve_source(model_dir.manifest.source).transformer_dir
        return checkpoint, {models.variant_of(model_dir): model_dir}, notes, arguments.model.name
    arch = arguments.arch or "bert-base"
    cache = arguments.out / "models"
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint = models.source_checkpoint(arch, cache)
    supported = models.supported_variants()
    variants: dict[str, object] = {}
    for variant in (arguments.variants or DEFAULT_VARIANTS[device]).split(","):
        if variant not in models.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {', '.join(models.VARIANTS)}")
        if not supported[variant]:  # type: ignore[index]
            notes.append(f"variant {variant} skipped: this exporter's ExportConfig has no option for it yet")
            continue
        if variant == "fp16" and device != "cuda":
            notes.append("variant fp16 skipped: fp16 ONNX is a GPU variant")
            continue
        try:
            variants[variant] = models.export_variant(checkpoint, variant, cache / f"{arch}-{variant}", log)  # type: ignore[arg-type]
        except ExportError as error:
            variants[variant] = f"export failed: {error}"
    return checkpoint, variants, notes, arch


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    device = resolve_device(arguments.device)
    import torch

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    configs = set(arguments.configs.split(","))
    checkpoint, variants, notes, model_name = prepare_models(arguments, device, log)
    model_dirs = {name: md for name, md in variants.items() if not isinstance(md, str)}
    if not model_dirs:
        raise SystemExit("no ONNX variant could be benchmarked: " + "; ".join(notes + [str(v) for v in variants.values()]))
    first = next(iter(model_dirs.values()))
    manifest = first.manifest  # type: ignore[attr-defined]
    if manifest.task != "embed" or (manifest.layers or "last") != "last" or manifest.token_embeddings:
        raise SystemExit(f"{first.path}: the benchmark measures embedding exports (last layer, pooled only)")  # type: ignore[attr-defined]
    shape = models.shape_of(checkpoint)
    rows = arguments.rows or DEFAULT_ROWS[device]
    budget_seconds = arguments.max_seconds if arguments.max_seconds is not None else DEFAULT_BUDGET_SECONDS[device]

    from worker.runner import Runner

    intended = data.mixed_and_fixed_lengths(rows, arguments.seed)
    runner = Runner(first, device, arguments.threads)  # type: ignore[arg-type]
    speed = budget.calibrate(runner, shape)
    del runner
    seen = {name: np.minimum(lengths, manifest.max_length) for name, lengths in intended.items()}
    batching = (arguments.batch_size, arguments.max_tokens)
    plan = budget.plan_rows(shape, seen, BUDGET_SHARES, list(model_dirs), device == "cuda", speed, budget_seconds, batching)
    planned = ", ".join(f"{name} {count}" for name, count in plan.rows.items())
    log(f"model speed {speed / 1e9:.1f} GFLOP/s; rows of {plan.generated_rows}: {planned}; ~{plan.estimated_seconds:.0f} s")
    if plan.cut:
        notes.append(
            f"rows cut to fit --max-seconds {budget_seconds:.0f} (estimated {plan.estimated_seconds:.0f} s): every configuration "
            f"ran on the same first rows of each dataset ({planned} of {plan.generated_rows} generated)"
        )

    from tokenizers import Tokenizer

    words = data.whole_words(Tokenizer.from_file(str(first.tokenizer_file)).get_vocab())  # type: ignore[attr-defined]
    work = arguments.out / "work"
    datasets, distributions = [], {}
    for name, lengths in intended.items():
        dataset = data.generate(name, lengths[: plan.rows[name]], words, work, arguments.seed + 1)
        untruncated = data.measured_lengths(first.tokenizer_file, dataset.texts)  # type: ignore[attr-defined]
        if not np.array_equal(untruncated, dataset.lengths):
            raise SystemExit(f"{name}: the tokenizer does not give one token per generated word; the length mix is off")
        truncated = np.minimum(untruncated, manifest.max_length)
        log(f"{name}: {dataset.rows} rows, tokens mean {untruncated.mean():.1f}, p50 {np.percentile(untruncated, 50):.0f}, p99 {np.percentile(untruncated, 99):.0f}")
        datasets.append((dataset, truncated))
        distributions[name] = {"tokens_generated": data.length_summary(untruncated), "tokens_seen_by_model": data.length_summary(truncated)}
        line = distributions[name]["tokens_generated"]
        notes.append(
            f"{name}: {dataset.rows} rows, tokenized lengths mean {line['mean']:.1f}, p50 {line['p50']:.0f}, p99 {line['p99']:.0f}, "
            f"max {line['max']}; {int((untruncated > manifest.max_length).sum())} rows truncated at the export's max_length {manifest.max_length}"
        )

    peak, peak_note = measure_peak_flops(device)
    started = time.perf_counter()
    measurements: list[Measurement] = []
    for dataset, lengths in datasets:
        measurements += run_dataset(dataset, lengths, checkpoint, variants, manifest, shape, device, arguments.threads, batching, configs, work, log)
    total_seconds = time.perf_counter() - started

    for dataset, _ in datasets:
        reference = next((m for m in measurements if m.dataset == dataset.name and m.kind == "pytorch-users" and m.precision == "fp32" and m.error is None), None)
        report.add_cosines([m for m in measurements if m.dataset == dataset.name], reference)
    numbers = [report.row_numbers(measurements, m, peak) for m in measurements]
    found = report.targets(measurements, device == "cuda")
    title = f"bertbatch benchmark: {model_name} on {device} ({plan.rows['mixed']} mixed rows)"
    notes += [
        f"peak FLOP/s {peak / 1e12:.3f} T: {peak_note}",
        FLOPS_FORMULA + f" (here P = {shape.non_embedding_parameters:,}, L = {shape.layers}, H = {shape.hidden})",
        "x best PT: rows/s over the fastest PyTorch row on the same data; x ceil: over the same variant's ceiling "
        "(PyTorch rows: the fastest ceiling of their precision); cos: per-row cosine to PyTorch fp32 as users write it",
        f"worker, best PyTorch and ceiling batches: at most {arguments.batch_size} rows and {arguments.max_tokens} padded tokens",
        "worker rows: Parquet read, tokenize, run, Parquet write, timed from session ready; PyTorch rows: texts in memory "
        "to numpy embeddings, tokenizing included; model loading untimed everywhere",
    ]
    if device == "cpu":
        notes.append("CPU run: the fp16 users' loop, padding-free PyTorch and device-bound ceilings are GPU rows, not run")
    print(f"\n{title}\n")
    print(report.format_table(numbers))
    print("\nnotes:")
    print("\n".join(f"  - {note}" for note in notes))
    print("targets (issue):")
    print("\n".join(target.line() for target in found))
    stem = f"bench-{device}-{model_name}"
    arguments.out.mkdir(parents=True, exist_ok=True)
    report.write_json(
        arguments.out / f"{stem}.json",
        {
            "title": title,
            "device": device,
            "model": model_name,
            "checkpoint": str(checkpoint),
            "variants": {name: (md if isinstance(md, str) else str(md.path)) for name, md in variants.items()},  # type: ignore[attr-defined]
            "threads": arguments.threads,
            "batching": {"batch_size": arguments.batch_size, "max_tokens": arguments.max_tokens},
            "rows_plan": plan.__dict__,
            "peak_flops": peak,
            "peak_note": peak_note,
            "flops_formula": FLOPS_FORMULA,
            "non_embedding_parameters": shape.non_embedding_parameters,
            "datasets": distributions,
            "results": numbers,
            "targets": [dict(target.__dict__, met=target.met) for target in found],
            "notes": notes,
            "measurement_seconds": total_seconds,
        },
    )
    written = [arguments.out / f"{stem}.json"]
    if arguments.plot:
        report.plot(arguments.out / f"{stem}.png", numbers, title)
        written.append(arguments.out / f"{stem}.png")
    print(f"\nwrote {' and '.join(str(path) for path in written)}")
    return 1 if any(m.error for m in measurements) else 0


def run_dataset(
    dataset: data.Dataset, lengths: np.ndarray, checkpoint: Path, variants: dict[str, object], manifest: object,
    shape: models.Shape, device: str, threads: int | None, batching: tuple[int, int], configs: set[str], work: Path,
    log: Callable[[str], None],
) -> list[Measurement]:
    """Every configuration over one dataset, one after the other; a failing one becomes a FAILED row."""
    from benchmarks import torch_baselines, worker_e2e

    common = (checkpoint, dataset.texts, lengths, manifest, shape, device)
    best_precision = "fp16" if device == "cuda" else "fp32"
    jobs: list[tuple[Kind, str, str, Callable[[], Measurement]]] = []
    if "users" in configs:
        for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
            run = partial(torch_baselines.run_users_loop, *common, precision, dataset.name)
            jobs.append(("pytorch-users", f"PyTorch as users write it ({precision})", precision, run))
    if "best" in configs:
        run = partial(torch_baselines.run_best_config, *common, best_precision, dataset.name, *batching)
        jobs.append(("pytorch-best", f"PyTorch best: SDPA, sorted batches ({best_precision})", best_precision, run))
    if "packed" in configs and device == "cuda":
        run = partial(torch_baselines.run_packed, *common, "fp16", dataset.name)
        jobs.append(("pytorch-packed", "PyTorch padding-free: flash varlen (fp16)", "fp16", run))
    for variant, model_dir in variants.items():
        precision = models.precision_of(variant)
        if "worker" in configs:
            run = partial(worker_e2e.run_worker, model_dir, dataset, lengths, shape, variant, precision, device, threads, batching, work)
            jobs.append(("worker", f"worker end to end ({variant})", precision, _unless_failed(model_dir, run)))
        if "ceiling" in configs:
            run = partial(_run_ceiling, model_dir, lengths, shape, variant, precision, dataset.name, device, threads, batching)
            jobs.append(("ceiling", f"ceiling: ONNX session, fixed shapes ({variant})", precision, _unless_failed(model_dir, run)))
    results = []
    for kind, name, precision, job in jobs:
        log(f"[{dataset.name}] {name} ...")
        try:
            result = job()
        except Exception as error:  # recorded as a FAILED row, printed in full, and the exit code says so
            traceback.print_exc(file=sys.stderr)
            result = Measurement(kind, name, dataset.name, precision, error=f"{type(error).__name__}: {error}")
        if kind in ("worker", "ceiling"):
            result.extra["variant"] = name.rsplit("(", 1)[1].rstrip(")")
        log(f"[{dataset.name}] {name}: " + (f"{result.rows_per_second:,.1f} rows/s" if result.error is None else f"FAILED {result.error}"))
        results.append(result)
        _release(device)
    return results


def _run_ceiling(model_dir: object, lengths: np.ndarray, shape: models.Shape, variant: str, precision: str, dataset: str,
                 device: str, threads: int | None, batching: tuple[int, int]) -> Measurement:
    from benchmarks.ceiling import run_ceiling
    from worker.runner import Runner

    return run_ceiling(Runner(model_dir, device, threads), lengths, shape, variant, precision, dataset, *batching)  # type: ignore[arg-type]


def _unless_failed(model_dir: object, run: Callable[[], Measurement]) -> Callable[[], Measurement]:
    """``run``, or, for a variant whose export failed, a job that raises that failure."""
    if not isinstance(model_dir, str):
        return run

    def fail() -> Measurement:
        raise RuntimeError(model_dir)

    return fail


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
