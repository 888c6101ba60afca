"""Long documents: chunked embedding (``--chunking mean`` / ``rows``) next to truncation, on the same rows.

Rows of 1k-20k tokens (plain vocabulary words, one token each). Truncation embeds only each row's first
``max_length`` tokens; chunking embeds every token, so it does more work per row: the table shows
rows/s and the tokens/s the model saw, both through ``worker.job.run_job`` end to end.

    python benchmarks/long_documents.py --model models/minilm --rows 24 [--max-length 256]
    (without --model: the packaged MiniLM, exported once under --cache)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data import whole_words  # noqa: E402
from worker.config import Chunking, RunConfig  # noqa: E402
from worker.job import run_job  # noqa: E402

MIN_TOKENS, MAX_TOKENS = 1_000, 20_000


def long_texts(vocabulary: list[str], rows: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``rows`` texts of 1k-20k content tokens (log-uniform), and their token counts."""
    rng = np.random.default_rng(seed)
    counts = np.exp(rng.uniform(np.log(MIN_TOKENS), np.log(MAX_TOKENS), size=rows)).astype(int)
    return [" ".join(rng.choice(vocabulary, size=count)) for count in counts], counts


def measure(model: Path, source: Path, work: Path, chunking: Chunking, max_length: int | None, overlap: int) -> dict[str, object]:
    config = RunConfig(
        model_dir=model, input=str(source), output=work / f"out-{chunking}", text_column="text", device="cpu",
        chunking=chunking, chunk_overlap=overlap, max_length=max_length, overwrite=True,
    )  # fmt: skip
    summary = run_job(config)
    return {
        "chunking": chunking,
        "rows": summary.rows,
        "output_rows": sum(pq.read_metadata(path).num_rows for path in config.output.glob("part-*.parquet")),
        "seconds": round(summary.seconds, 2),
        "rows_per_second": round(summary.rows_per_second, 3),
        "model_tokens": summary.tokens,
        "tokens_per_second": round(summary.tokens_per_second, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported embed model (default: the packaged MiniLM, exported into --cache)")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache"))
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    model = args.model or _packaged_minilm(args.cache)
    from tokenizers import Tokenizer

    vocabulary = whole_words(Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab())
    texts, counts = long_texts(vocabulary, args.rows)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        source = work / "long.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
        print(f"{len(texts)} rows of {counts.min()}-{counts.max()} tokens (mean {counts.mean():.0f}), model {model}")
        results = [measure(model, source, work, mode, args.max_length, args.overlap) for mode in ("off", "mean", "rows")]
    print(f"{'chunking':>9} {'rows/s':>9} {'tokens/s':>10} {'model tokens':>13} {'output rows':>12} {'seconds':>8}")
    for row in results:
        print(f"{row['chunking']:>9} {row['rows_per_second']:>9} {row['tokens_per_second']:>10} {row['model_tokens']:>13} {row['output_rows']:>12} {row['seconds']:>8}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(row["rows"] == len(texts) for row in results) else 1


def _packaged_minilm(cache: Path) -> Path:
    from benchmarks.models import minilm_checkpoint
    from exporter.export import ExportConfig, export_model

    out = cache / "long-documents-minilm"
    if not (out / "bertbatch.json").is_file():
        export_model(ExportConfig(source=str(minilm_checkpoint()), task="embed", out=out, overwrite=True), log=lambda line: None)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
