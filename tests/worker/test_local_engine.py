"""The local engine and the job around it, with a fake session (no export, no onnxruntime)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelless import FakeRunner, embedding_of, fake_model_dir, fake_runner_factory, ids, manifest

from worker.checks import CheckedJob, check_job
from worker.config import RunConfig
from worker.errors import InferenceBroken
from worker.job import run_job
from worker.jobstate import JOB_FILE, SUCCESS_FILE
from worker.local_engine import compute_locally
from worker.modeldir.session import CUDA
from worker.source import plan_shards
from worker.tokenize import load_tokenizer
from worker.window import LoadedModel, compute_window, plan_windows, prepare_shard

EMBED = manifest("embed")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
TEXTS = [" ".join(WORDS[: 1 + i % len(WORDS)]) for i in range(50)]


def stage_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("bertbatch-")]


@pytest.fixture
def config(tmp_path: Path) -> RunConfig:
    model_dir = fake_model_dir(tmp_path / "model", EMBED)
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), tmp_path / "in.parquet", row_group_size=10)
    return RunConfig(
        model_dir=model_dir.path, input=str(tmp_path / "in.parquet"), output=tmp_path / "out", text_column="text",
        id_column="id", rows_per_shard=20, read_batch_rows=8, batch_size=4,
    )


def test_windows_come_in_shard_order_as_the_shared_window_functions_compute_them(config: RunConfig) -> None:
    job = check_job(config)
    shards = plan_shards(job.files, config.rows_per_shard)
    assert [shard.num_rows for shard in shards] == [20, 20, 10]
    with compute_locally(config, job, shards, fake_runner_factory(EMBED)) as (provider, windows):
        computed = list(windows)
    assert provider == "CPUExecutionProvider"
    assert [(window.shard.name, window.index, window.last_of_shard) for window in computed] == [
        (shards[0].name, 0, False), (shards[0].name, 1, False), (shards[0].name, 2, True),
        (shards[1].name, 0, False), (shards[1].name, 1, False), (shards[1].name, 2, True),
        (shards[2].name, 0, False), (shards[2].name, 1, True),
    ]
    # The same rows the shared functions give, called one by one.
    plan = plan_windows(config, EMBED, job.max_length, on_gpu=False)
    tokenizer = load_tokenizer(job.model_dir.tokenizer_file, plan.max_length)
    model = LoadedModel(EMBED, FakeRunner(EMBED), [])
    expected = [compute_window(plan, model, window) for shard in shards for window in prepare_shard(plan, tokenizer, job.files[0], shard)]
    assert [window.table for window in computed] == [window.table for window in expected]
    assert not stage_threads()


def test_the_plan_follows_the_session_the_engine_got(config: RunConfig) -> None:
    runners: list[FakeRunner] = []

    def on_cuda(*args: object) -> FakeRunner:
        runner = FakeRunner(EMBED)
        runner.provider = CUDA
        runners.append(runner)
        return runner

    job = check_job(config)
    with compute_locally(config, job, plan_shards(job.files, 20)[:1], on_cuda) as (provider, windows):
        list(windows)
    assert provider == CUDA
    assert {batch.input_ids.shape[1] % 8 for batch in runners[0].batches} == {0}  # GPU padding multiple


def test_leaving_early_stops_and_joins_the_stage_threads(config: RunConfig) -> None:
    job = check_job(config)
    with compute_locally(config, job, plan_shards(job.files, 20), fake_runner_factory(EMBED)) as (_, windows):
        next(windows)
        assert stage_threads()
    assert not stage_threads()


def test_a_failure_in_the_run_stage_reaches_the_consumer_and_stops_the_threads(config: RunConfig) -> None:
    job = check_job(config)
    calls = 0

    def fails_from_the_third_batch(batch: object) -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    with pytest.raises(InferenceBroken):
        with compute_locally(config, job, plan_shards(job.files, 20), fake_runner_factory(EMBED, fails_from_the_third_batch)) as (_, windows):
            list(windows)
    assert not stage_threads()


def test_a_job_writes_every_shard_then_a_rerun_skips_them(config: RunConfig) -> None:
    summary = run_job(config, make_runner=fake_runner_factory(EMBED))
    assert (summary.rows, summary.error_rows, summary.shards_written, summary.shards_skipped) == (50, 0, 3, 0)
    assert summary.tokens == sum(len(ids(text)) for text in TEXTS)
    output = pq.read_table(config.output)
    assert output.column_names == ["id", "num_tokens", "truncated", "embedding", "error"]
    assert output.column("id").to_pylist() == list(range(50))
    assert output.column("embedding").to_pylist() == [embedding_of(ids(text)) for text in TEXTS]
    assert json.loads((config.output / SUCCESS_FILE).read_text()) == {
        "rows_this_run": 50, "error_rows_this_run": 0, "provider": "CPUExecutionProvider"
    }
    assert sorted(json.loads((config.output / JOB_FILE).read_text())["completed"].values()) == [10, 20, 20]
    again = run_job(config, make_runner=fake_runner_factory(EMBED))
    assert again.already_complete and again.shards_skipped == 3


def test_the_checks_report_what_they_found(config: RunConfig) -> None:
    job = check_job(config)
    assert isinstance(job, CheckedJob)
    assert (job.model_dir.manifest, job.max_length, [f.num_rows for f in job.files]) == (EMBED, EMBED.max_length, [50])
