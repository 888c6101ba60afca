"""Crash safety with chunking and quantization: a job SIGKILLed mid-run, then rerun, writes what an
uninterrupted run writes, with ``--chunking rows`` (a shard holds every chunk of its rows) and with
``--embedding-dtype int8`` (the resumed run quantizes with the ranges stored in the job file)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from exporter.export import ExportResult
from test_crash import ROWS, SHARDS, Job, part_files, read_output, summary_of, temporaries, wait_until, write_inputs
from worker.jobstate import JOB_FILE, LOCK_FILE, SUCCESS_FILE
from worker.quantization import RANGES_METADATA_KEY

# Chunks of 6 content tokens (8 less [CLS] and [SEP]) sharing 2: the inputs' 1-24 words make 1-6 chunks a row.
OPTIONS = {
    "chunking rows": ("--max-length", "8", "--chunking", "rows", "--chunk-overlap", "2"),
    "int8": ("--embedding-dtype", "int8", "--calibration-rows", "50"),
}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_embed_export: ExportResult) -> Job:
    return Job(tiny_embed_export.directory, write_inputs(tmp_path_factory.mktemp("crash-long") / "inputs"))


def assert_same_output(output: Path, reference: Path, options: str) -> None:
    assert {path.name for path in output.iterdir()} == {path.name for path in part_files(output)} | {JOB_FILE, SUCCESS_FILE, LOCK_FILE}
    assert not temporaries(output)
    assert [path.name for path in part_files(output)] == [path.name for path in part_files(reference)]
    assert len(part_files(output)) == SHARDS
    got, expected = read_output(output), read_output(reference)
    assert got.schema.equals(expected.schema, check_metadata=False)
    for name in expected.column_names:
        if name != "embedding":
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    present = [i for i, vector in enumerate(expected.column("embedding").to_pylist()) if vector is not None]
    got_vectors = np.array([got.column("embedding")[i].as_py() for i in present], dtype=np.float64)
    expected_vectors = np.array([expected.column("embedding")[i].as_py() for i in present], dtype=np.float64)
    if options == "int8":
        recorded = [json.loads((d / JOB_FILE).read_text())["embedding_ranges"] for d in (output, reference)]
        assert recorded[0] == recorded[1]
        for path in part_files(output):
            assert json.loads(pq.read_schema(path).metadata[RANGES_METADATA_KEY])["ranges"] == recorded[0]
        # Same ranges, same batches: the same buckets (onnxruntime under load may move a value across an edge).
        assert np.abs(got_vectors - expected_vectors).max() <= 1 and (got_vectors == expected_vectors).mean() > 0.999
    else:
        np.testing.assert_allclose(got_vectors, expected_vectors, rtol=0, atol=1e-6)
        assert got.num_rows > ROWS  # one row per chunk
        ids = got.column("id").to_pylist()
        assert ids == sorted(ids), "rows out of order"
        for path in part_files(output):  # a shard boundary never splits a row's chunks
            shard = pq.read_table(path, columns=["id", "chunk"]).to_pylist()
            first = [row for row in shard if row["chunk"] in (0, None)]
            assert len({row["id"] for row in shard}) == len(first)


@pytest.mark.parametrize("options", list(OPTIONS))
def test_sigkill_mid_job_then_rerun_gives_the_uninterrupted_output(tmp_path: Path, job: Job, options: str) -> None:
    extra = OPTIONS[options]
    reference = tmp_path / "reference"
    completed = job.run(reference, *extra)
    assert completed.returncode == 0, completed.stderr

    output = tmp_path / "out"
    process = job.start(output, *extra)
    wait_until(lambda: len(part_files(output)) >= 4, process, "four committed shards")
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (output / SUCCESS_FILE).exists()
    done = len(json.loads((output / JOB_FILE).read_text())["completed"])
    assert 0 < done < SHARDS

    rerun = job.run(output, *extra)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_of(rerun)["shards_skipped"] == done
    assert_same_output(output, reference, options)


def test_a_resumed_int8_job_quantizes_with_the_ranges_in_its_job_file(tmp_path: Path, job: Job) -> None:
    extra = OPTIONS["int8"]
    output = tmp_path / "out"
    process = job.start(output, *extra)
    wait_until(lambda: len(part_files(output)) >= 2, process, "two committed shards")
    process.kill()
    process.communicate()
    record = json.loads((output / JOB_FILE).read_text())
    done = set(record["completed"])
    # Not recomputed on resume: ranges changed in the job file are the ones the new shards use.
    record["embedding_ranges"] = [[value - 1.0 for value in record["embedding_ranges"][0]], record["embedding_ranges"][1]]
    (output / JOB_FILE).write_text(json.dumps(record))
    rerun = job.run(output, *extra)
    assert rerun.returncode == 0, rerun.stderr
    for path in part_files(output):
        ranges = json.loads(pq.read_schema(path).metadata[RANGES_METADATA_KEY])["ranges"]
        edited = np.allclose(ranges, record["embedding_ranges"], rtol=0, atol=1e-6)  # stored as float32
        assert edited == (path.name not in done), path.name
