"""What the Ray engine's driver pays per row: peak RSS, CPU seconds and bytes received, with wide rows.

    python benchmarks/ray_driver.py --rows 10000,100000 --out results/ray-driver

Each input row carries a passthrough column of ``--row-bytes`` (default 50 KB) beside a short
text, so a design that moves rows through the driver shows it. A local Ray cluster
(``ray.cluster_utils.Cluster``: a head without CPUs and one worker node) runs the job; the
driver is a separate process (``--measure-driver``, the same ``run_job`` as ``bertbatch run
--engine ray --ray-address``) so that its figures are its own and not the cluster's:

- peak RSS: the driver process's high-water mark (``VmHWM``),
- CPU seconds: user + system time of the driver process (Ray's threads in it included),
- bytes received: the size of every Arrow batch the driver's ``Dataset.iter_batches`` handed
  to the engine (the only way rows reach the driver in either design), per shard.

The model is a tiny random BERT (2 layers, 32 hidden), so the model's own cost does not hide
the driver's. Prints one JSON line per row count and writes ``<out>/ray-driver.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS_PER_SHARD = 5000
READ_BATCH_ROWS = 1000
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def write_wide_inputs(path: Path, rows: int, row_bytes: int) -> Path:
    """``rows`` rows: id, a short text and a ``blob`` of ``row_bytes`` bytes (compressible, so the file stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    group = 1000
    pattern = bytes(range(256)) * (row_bytes // 256 + 1)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("blob", pa.binary())])
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for start in range(0, rows, group):
            ids = range(start, min(rows, start + group))
            texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(5 + i % 20)) for i in ids]
            blobs = [i.to_bytes(8, "little") + pattern[: row_bytes - 8] for i in ids]
            writer.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": texts, "blob": blobs}, schema=schema))
    partial.rename(path)
    return path


def tiny_model(cache: Path) -> Path:
    """A random 2-layer, 32-hidden BERT exported for ``embed`` (cached)."""
    from benchmarks.models import tokenizer_directory

    export = cache / "tiny-embed"
    if (export / "bertbatch.json").is_file():
        return export
    import torch
    import transformers

    from exporter.export import ExportConfig, export_model

    checkpoint = cache / "tiny-checkpoint"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
    )
    transformers.BertModel(config).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer_directory() / name, checkpoint / name)
    export_model(ExportConfig(source=str(checkpoint), task="embed", out=export), log=lambda line: None)  # type: ignore[arg-type]
    return export


def measure_driver(address: str, model: Path, inputs: Path, output: Path, num_workers: int, rows_per_shard: int) -> dict[str, Any]:
    """Run one job as this process (the driver) and return its own costs."""
    import pyarrow as pa
    import ray.data

    from worker.config import RunConfig
    from worker.job import run_job

    received: list[int] = []
    iter_batches = ray.data.Dataset.iter_batches

    def counting_iter_batches(self: Any, *args: Any, **kwargs: Any) -> Any:
        for batch in iter_batches(self, *args, **kwargs):
            assert isinstance(batch, pa.Table), "both designs ask for pyarrow batches"
            received.append(batch.nbytes)
            yield batch

    ray.data.Dataset.iter_batches = counting_iter_batches  # type: ignore[method-assign]
    config = RunConfig(
        model_dir=model, input=str(inputs), output=output, text_column="text", id_column="id", device="cpu",
        rows_per_shard=rows_per_shard, read_batch_rows=READ_BATCH_ROWS, engine="ray", num_workers=num_workers,
        ray_address=address,
    )  # fmt: skip
    started = time.perf_counter()
    summary = run_job(config)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows": summary.rows,
        "shards": summary.shards_written,
        "seconds": round(seconds, 1),
        "driver_peak_rss_mb": round(peak_rss_kib() / 1024, 1),
        "driver_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "bytes_received": sum(received),
        "bytes_received_per_shard": round(sum(received) / max(1, summary.shards_written)),
    }


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that over ``exec`` from the
    parent that forked this process, so it would report the parent's size when the parent was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated row counts, one job each")
    parser.add_argument("--row-bytes", type=int, default=50_000, help="bytes of the passthrough column per row")
    parser.add_argument("--num-workers", type=int, default=1, help="inference actors")
    parser.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD)
    parser.add_argument("--design", default="current", help="a label for the JSON (e.g. driver-writes, workers-write)")
    parser.add_argument("--out", type=Path, default=Path("results/ray-driver"))
    parser.add_argument("--measure-driver", nargs=4, metavar=("ADDRESS", "MODEL", "INPUTS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_driver:
        address, model, inputs, output = args.measure_driver
        print(json.dumps(measure_driver(address, Path(model), Path(inputs), Path(output), args.num_workers, args.rows_per_shard)))
        return

    from ray.cluster_utils import Cluster

    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(args.out)
    # A head that runs nothing (as on a real cluster) and a worker node: reading + the actors.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=args.num_workers + 1, object_store_memory=1 << 30)
    cluster.wait_for_nodes()
    results = []
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = write_wide_inputs(args.out / f"wide-{rows}.parquet", rows, args.row_bytes)
            output = args.out / f"output-{rows}"
            shutil.rmtree(output, ignore_errors=True)  # a fresh job every time, never a resumed one
            command = [
                sys.executable, str(Path(__file__).resolve()), "--num-workers", str(args.num_workers),
                "--rows-per-shard", str(args.rows_per_shard),
                "--measure-driver", cluster.address, str(model), str(inputs), str(output),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
            if done.returncode != 0:
                sys.exit(f"the driver failed:\n{done.stderr[-4000:]}")
            result = {"design": args.design, "row_bytes": args.row_bytes, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        cluster.shutdown()
    (args.out / f"ray-driver-{args.design}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
