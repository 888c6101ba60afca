"""Throughput benchmark: the worker end to end vs PyTorch baselines vs the model-only ceiling.

    python benchmarks/bench.py --arch bert-base            # random-weight BERT-base, no download
    python benchmarks/bench.py --arch minilm --rows 1000   # the packaged all-MiniLM-L6-v2
    python benchmarks/bench.py --model models/my-export    # any export; PyTorch loads its manifest's source

Every configuration runs in this one process on the same generated rows: a log-normal
length mix (mean ~82 tokens, p99 ~381, cap 512) and a set of 128-token rows. Prints one
table and the issue's targets, and writes ``<out>/bench-<device>-<model>.json`` (every
number) and ``.png`` (throughput by length bucket); exports and the generated data go
under ``--cache`` (default: ``--out``), and exports are reused while still valid. GPU rows
and the GPU variants (fp16, packed) run only where both PyTorch and onnxruntime see CUDA.
On CPU a time budget (``--max-seconds``) cuts the rows, the same rows for every
configuration, and the notes say so.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import budget, data, models, report
from benchmarks.measure import Measurement, measure_peak_flops
from benchmarks.suite import CONFIGS, Device, Setup, run_dataset
from worker.config import BATCH_LIMITS

DEFAULT_ROWS = {"cpu": 2000, "cuda": 20000}
DEFAULT_VARIANTS = {"cpu": "fp32,optimized,int8", "cuda": "optimized,fp16,packed"}
DEFAULT_BUDGET_SECONDS = {"cpu": 240.0, "cuda": 0.0}
# How a time budget is shared: the mixed set carries the targets, the fixed set checks one shape.
BUDGET_SHARES = {"mixed": 0.7, "fixed-128": 0.3}
FLOPS_FORMULA = "FLOPs per row of n real tokens = n * (2 * P + 4 * L * n * H); P = non-embedding parameters, L layers, H hidden"
Log = Callable[[str], None]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=("bert-base", "minilm"), help="build/export this model (default: bert-base)")
    source.add_argument("--model", type=Path, help="an exported model directory, benchmarked as it is")
    parser.add_argument("--rows", type=int, help="rows per dataset (default 2000 on CPU, 20000 on GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--variants",
        help=f"ONNX variants for --arch, of {','.join(models.VARIANTS)} (default CPU: {DEFAULT_VARIANTS['cpu']}; GPU: {DEFAULT_VARIANTS['cuda']})",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations to run, of {','.join(CONFIGS)} (default all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the JSON and the PNG go")
    parser.add_argument("--cache", type=Path, help="where exports (reused while valid) and generated data go (default: --out)")
    parser.add_argument("--batch-size", type=int, help="rows per batch: worker, best PyTorch, ceiling (default: the worker's for the device)")
    parser.add_argument("--max-tokens", type=int, help="padded tokens per batch for the same (default: the worker's for the device)")
    parser.add_argument("--threads", type=int, help="intra-op threads for onnxruntime and torch (default: their own)")
    parser.add_argument("--max-seconds", type=float, help="measurement budget; rows are cut, alike for every configuration, to fit (default 240 on CPU, none on GPU; 0 = none)")
    parser.add_argument("--repeats", type=int, default=1, help="run each configuration this many times and keep the fastest (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG (no matplotlib needed)")
    arguments = parser.parse_args(argv)
    if arguments.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the plot needs matplotlib: pip install 'bertbatch[bench]' (or pass --no-plot)")
    arguments.cache = arguments.cache or arguments.out
    if arguments.model and arguments.variants:
        parser.error("--variants applies to --arch; --model DIR benchmarks that export as it is")
    unknown = set(arguments.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    return arguments


def resolve_device(wanted: str) -> Device:
    """CUDA only when both PyTorch and onnxruntime can use it."""
    import onnxruntime
    import torch

    from worker.modeldir.session import CUDA

    cuda = torch.cuda.is_available() and CUDA in onnxruntime.get_available_providers()
    if wanted == "cuda" and not cuda:
        raise SystemExit("--device cuda: PyTorch or onnxruntime sees no CUDA device here; use --device cpu or auto")
    return "cuda" if cuda and wanted != "cpu" else "cpu"


def prepare_models(arguments: argparse.Namespace, device: Device, notes: list[str], log: Log) -> tuple[Path, dict[str, Any], str]:
    """The PyTorch checkpoint, the ONNX variants (name -> ModelDir, or the error that stopped its export), a name."""
    from exporter.errors import ExportError
    from exporter.source import resolve_source
    from worker.runner import ModelDir, open_model_dir

    if arguments.model:
        model_dir = open_model_dir(arguments.model)
        checkpoint = resolve_source(model_dir.manifest.source).transformer_dir
        return checkpoint, {models.variant_of(model_dir): model_dir}, arguments.model.name
    arch: models.Arch = arguments.arch or "bert-base"
    cache = arguments.cache / "models"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = models.source_checkpoint(arch, cache)
    except models.TokenizerFilesNotFound as error:
        raise SystemExit(f"--arch {arch}: {error}") from error
    supported = models.supported_variants()
    variants: dict[str, ModelDir | str] = {}
    for variant in (arguments.variants or DEFAULT_VARIANTS[device]).split(","):
        if variant not in models.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {', '.join(models.VARIANTS)}")
        if not supported[variant]:  # type: ignore[index]
            notes.append(f"variant {variant} skipped: this exporter's ExportConfig has no option for it")
        elif variant in models.GPU_VARIANTS and device != "cuda":
            notes.append(f"variant {variant} skipped: {variant} ONNX is a GPU variant")
        else:
            try:
                variants[variant] = models.export_variant(checkpoint, variant, cache / f"{arch}-{variant}", log)  # type: ignore[arg-type]
            except ExportError as error:
                variants[variant] = f"export failed: {error}"
    return checkpoint, variants, arch


def prepare_datasets(setup: Setup, arguments: argparse.Namespace, notes: list[str], log: Log) -> tuple[list[tuple[data.Dataset, np.ndarray]], dict[str, Any], budget.Plan]:
    """Plan the rows (time budget), generate the Parquet files, and check their token lengths with the real tokenizer."""
    from tokenizers import Tokenizer

    from worker.runner import Runner

    first = next(iter(setup.model_dirs.values()))
    max_length = setup.manifest.max_length
    intended = data.mixed_and_fixed_lengths(arguments.rows or DEFAULT_ROWS[setup.device], arguments.seed)
    budget_seconds = arguments.max_seconds if arguments.max_seconds is not None else DEFAULT_BUDGET_SECONDS[setup.device]
    speed = budget.calibrate(Runner(first, setup.device, setup.threads), setup.shape)
    seen = {name: np.minimum(lengths, max_length) for name, lengths in intended.items()}
    plan = budget.plan_rows(
        setup.shape, seen, BUDGET_SHARES, list(setup.model_dirs), setup.device == "cuda", speed / setup.repeats,
        budget_seconds, (setup.batch_size, setup.max_tokens),
    )
    planned = ", ".join(f"{name} {count}" for name, count in plan.rows.items())
    log(f"model speed {speed / 1e9:.1f} GFLOP/s; rows of {plan.generated_rows}: {planned}; ~{plan.estimated_seconds:.0f} s")
    if plan.cut:
        notes.append(
            f"rows cut to fit --max-seconds {budget_seconds:.0f} (estimated {plan.estimated_seconds:.0f} s): every "
            f"configuration ran on the same first rows of each dataset ({planned} of {plan.generated_rows} generated)"
        )
    words = data.whole_words(Tokenizer.from_file(str(first.tokenizer_file)).get_vocab())
    datasets, distributions = [], {}
    for name, lengths in intended.items():
        dataset = data.generate(name, lengths[: plan.rows[name]], words, setup.work, arguments.seed + 1)
        tokenized = data.measured_lengths(first.tokenizer_file, dataset.texts)
        if not np.array_equal(tokenized, dataset.lengths):
            raise SystemExit(f"{name}: the tokenizer does not give one token per generated word; the length mix is off")
        truncated = np.minimum(tokenized, max_length)
        datasets.append((dataset, truncated))
        summary = data.length_summary(tokenized)
        distributions[name] = {"tokens_generated": summary, "tokens_seen_by_model": data.length_summary(truncated)}
        line = (
            f"{name}: {dataset.rows} rows, tokenized lengths mean {summary['mean']:.1f}, p50 {summary['p50']:.0f}, "
            f"p99 {summary['p99']:.0f}, max {summary['max']}; {int((tokenized > max_length).sum())} rows truncated at "
            f"the export's max_length {max_length}"
        )
        log(line)
        notes.append(line)
    return datasets, distributions, plan


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    log: Log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    device = resolve_device(arguments.device)
    import torch

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    notes: list[str] = []
    checkpoint, variants, model_name = prepare_models(arguments, device, notes, log)
    usable = [md for md in variants.values() if not isinstance(md, str)]
    if not usable:
        raise SystemExit("no ONNX variant can be benchmarked: " + "; ".join(notes + [str(v) for v in variants.values()]))
    manifest = usable[0].manifest
    if manifest.task != "embed" or (manifest.layers or "last") != "last" or manifest.token_embeddings:
        raise SystemExit(f"{usable[0].path}: the benchmark measures embedding exports (last layer, pooled vectors only)")
    default_rows, default_tokens = BATCH_LIMITS["cuda" if device == "cuda" else "cpu"]
    setup = Setup(
        checkpoint, variants, manifest, models.shape_of(checkpoint), device, arguments.threads,
        arguments.batch_size or default_rows, arguments.max_tokens or default_tokens, frozenset(arguments.configs.split(",")), arguments.cache / "work", max(1, arguments.repeats),
    )
    datasets, distributions, plan = prepare_datasets(setup, arguments, notes, log)
    peak, peak_note = measure_peak_flops(device)
    started = time.perf_counter()
    measurements: list[Measurement] = []
    for dataset, lengths in datasets:
        rows = run_dataset(setup, dataset, lengths, log)
        report.add_cosines(rows, next((m for m in rows if m.kind == "pytorch-users" and m.precision == "fp32" and m.error is None), None))
        measurements += rows
    # Measured again after the runs, the higher kept: a busy neighbour during one measurement would understate it.
    measured_seconds = time.perf_counter() - started
    peak, peak_note = max((peak, peak_note), measure_peak_flops(device))
    notes += [
        f"peak FLOP/s {peak / 1e12:.3f} T: {peak_note}",
        f"{FLOPS_FORMULA} (here P = {setup.shape.non_embedding_parameters:,}, L = {setup.shape.layers}, H = {setup.shape.hidden})",
        "x best PT: rows/s over the fastest PyTorch row on the same data; x ceil: over the same variant's ceiling "
        "(PyTorch rows: the fastest ceiling of their precision); cos: per-row cosine to PyTorch fp32 as users write it",
        f"worker, best PyTorch and ceiling batches: at most {setup.batch_size} rows and {setup.max_tokens} padded tokens",
        f"each configuration: the fastest of {setup.repeats} run(s)",
        "worker rows: Parquet read, tokenize, run, Parquet write, timed from session ready; PyTorch rows: texts in memory "
        "to numpy embeddings, tokenizing included; model loading untimed everywhere",
    ]
    if device == "cpu":
        notes.append("CPU run: the fp16 users' loop, padding-free PyTorch and device-bound ceilings are GPU rows, not run")
    host_pipeline, host_notes = report.host_headroom(measurements, device == "cuda")
    if host_notes:
        notes.append(
            "host row: the worker's job with the model call stubbed (zeros), same batching, timed like the worker rows; "
            "headroom near 1x means host work, not the model, sets the worker's speed"
        )
        notes += host_notes
    document = {
        "title": f"bertbatch benchmark: {model_name} on {device} ({plan.rows['mixed']} mixed rows)",
        "device": device,
        "model": model_name,
        "checkpoint": str(checkpoint),
        "variants": {name: (md if isinstance(md, str) else str(md.path)) for name, md in variants.items()},
        "threads": arguments.threads,
        "repeats": setup.repeats,
        "batching": {"batch_size": setup.batch_size, "max_tokens": setup.max_tokens},
        "rows_plan": plan.__dict__,
        "peak_flops": peak,
        "peak_note": peak_note,
        "flops_formula": FLOPS_FORMULA,
        "non_embedding_parameters": setup.shape.non_embedding_parameters,
        "datasets": distributions,
        "results": [report.row_numbers(measurements, m, peak) for m in measurements],
        "targets": report.targets(measurements, device == "cuda"),
        "host_pipeline": host_pipeline,
        "notes": notes,
        "measurement_seconds": measured_seconds,
    }
    publish(document, arguments.out / f"bench-{device}-{model_name}", arguments.plot)
    return 1 if any(m.error for m in measurements) else 0


def publish(document: dict[str, Any], stem: Path, plot: bool) -> None:
    """Print the table, the notes and the targets; write the JSON (and the PNG)."""
    targets: list[report.Target] = document["targets"]
    print(f"\n{document['title']}\n")
    print(report.format_table(document["results"]))
    print("\nnotes:")
    print("\n".join(f"  - {note}" for note in document["notes"]))
    print("targets (issue):")
    print("\n".join(target.line() for target in targets))
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.parent / f"{stem.name}.json"]
    report.write_json(written[0], dict(document, targets=[dict(t.__dict__, met=t.met) for t in targets]))
    if plot:
        written.append(stem.parent / f"{stem.name}.png")
        report.plot(written[1], document["results"], document["title"])
    print(f"\nwrote {' and '.join(str(path) for path in written)}")


if __name__ == "__main__":
    sys.exit(main())
