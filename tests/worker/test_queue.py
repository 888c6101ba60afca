"""The Redis job queue against a real ``redis-server`` on loopback, with real ``bertbatch serve`` processes.

Jobs are submitted through the CLI, run by worker processes, one of which is SIGKILLed or SIGTERMed
mid-job. Every output must equal a plain local ``run_job``'s, row for row: a re-delivered job resumes
from its committed shards and never duplicates them. No test hook is involved: kill points are found
by watching the output directory's job file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from exporter.export import ExportResult
from worker.cli import app
from worker.config import RunConfig, config_from_spec, config_to_spec
from worker.exit_codes import ExitCode
from worker.job import run_job
from worker.jobstate import JOB_FILE, SUCCESS_FILE

ROWS_PER_SHARD = 250
LEASE_SECONDS = 3
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, with an append-only file; its URL without the database number."""
    server = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    if server is None or redis is None:
        missing = "redis-server" if server is None else "the redis package (pip install '.[queue]')"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing in CI: .ci/run installs redis-server and the README installs the queue extra")
        pytest.skip(f"{missing} is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def queue_url(redis_server: str) -> str:
    import redis

    url = f"{redis_server}/0"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def model(tiny_embed_export: ExportResult) -> Path:
    return tiny_embed_export.directory


def write_input(path: Path, rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    texts = [None if i % 101 == 7 else " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for i in range(rows)]
    table = pa.table({"id": pa.array(range(seed * 100_000, seed * 100_000 + rows), pa.int64()), "text": pa.array(texts, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROWS_PER_SHARD)
    return path


def reference_output(model: Path, source: Path, output: Path) -> pa.Table:
    """What every queued job over ``source`` must end up with: a plain local run."""
    run_job(RunConfig(model_dir=model, input=str(source), output=output, text_column="text", id_column="id",
                      rows_per_shard=ROWS_PER_SHARD, threads=1))  # fmt: skip
    return read_output(output)


def read_output(output: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in sorted(output.glob("part-*.parquet")))


def assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    assert got.column_names == expected.column_names
    assert got.column("id").to_pylist() == expected.column("id").to_pylist()  # same rows, once each, in order
    assert got.column("error").to_pylist() == expected.column("error").to_pylist()
    for mine, theirs in zip(got.column("embedding").to_pylist(), expected.column("embedding").to_pylist()):
        if theirs is None:
            assert mine is None
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def submit(queue_url: str, model: Path, source: Path, output: Path, roots: list[Path], *extra: str) -> Any:
    return CliRunner().invoke(app, [
        "submit", "--queue", queue_url, *[arg for root in roots for arg in ("--allow-root", str(root))],
        "--model", str(model), "--input", str(source), "--output", str(output),
        "--text-column", "text", "--id-column", "id", "--rows-per-shard", str(ROWS_PER_SHARD), "--threads", "1", *extra,
    ])  # fmt: skip


def submitted(queue_url: str, model: Path, source: Path, output: Path, roots: list[Path]) -> str:
    result = submit(queue_url, model, source, output, roots)
    assert result.exit_code == 0, result.output
    return str(result.stdout.strip())


def job_status(queue_url: str, job_id: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["status", job_id, "--queue", queue_url, "--log-format", "json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def queue_counts(queue_url: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["status", "--queue", queue_url, "--log-format", "json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


class Worker:
    """A ``bertbatch serve`` process logging JSON lines to a file."""

    def __init__(self, name: str, queue_url: str, roots: list[Path], log_dir: Path, *extra: str) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        command = [
            sys.executable, "-m", "worker.cli", "serve", "--queue", queue_url, "--worker-id", name,
            *[arg for root in roots for arg in ("--allow-root", str(root))],
            "--lease-seconds", str(LEASE_SECONDS), "--poll-seconds", "0.2", "--log-format", "json", *extra,
        ]  # fmt: skip
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        return [event for event in map(json.loads, lines) if kind is None or event["event"] == kind]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def wait_until(condition: Callable[[], bool], what: str, workers: list[Worker], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {worker.name}\n{worker.log.read_text()}" for worker in workers)
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.005)


def committed_shards(output: Path) -> int:
    try:
        return len(json.loads((output / JOB_FILE).read_text())["completed"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def test_submit_checks_the_job_and_queues_nothing_when_a_check_fails(tmp_path: Path, queue_url: str, model: Path) -> None:
    data = tmp_path / "data"
    source = write_input(data / "in.parquet", 10, seed=1)
    outside = write_input(tmp_path / "outside" / "in.parquet", 10, seed=2)
    (data / "sneaky.parquet").symlink_to(outside)
    roots = [data, model]

    refused = [
        (submit(queue_url, model, source, tmp_path / "outside" / "out", roots), ExitCode.PATH_NOT_ALLOWED, "--output"),
        (submit(queue_url, model, outside, data / "out", roots), ExitCode.PATH_NOT_ALLOWED, "--input"),
        (submit(queue_url, model, data / "sneaky.parquet", data / "out", roots), ExitCode.PATH_NOT_ALLOWED, "outside the allowed roots"),
        (submit(queue_url, model, data / ".." / "outside" / "in.parquet", data / "out", roots), ExitCode.PATH_NOT_ALLOWED, "--input"),
        (submit(queue_url, model, source, data / "out", [data]), ExitCode.PATH_NOT_ALLOWED, "--model"),
        (submit(queue_url, data / "no-model", source, data / "out", roots), ExitCode.MODEL_ERROR, "no-model"),
        (submit(queue_url, model, data / "missing.parquet", data / "out", roots), ExitCode.INPUT_ERROR, "missing.parquet"),
        (submit(queue_url, model, source, data / "out", roots, "--text-column", "body"), ExitCode.INPUT_ERROR, "'body'"),
    ]
    for result, code, message in refused:
        assert result.exit_code == code, result.output
        assert message in result.output
    assert not (data / "out").exists()
    assert queue_counts(queue_url) == {"event": "queue", "pending": 0, "processing": 0, "dead": 0, "dead_ids": []}

    job_id = submitted(queue_url, model, source, data / "out", roots)
    status = job_status(queue_url, job_id)
    assert status["state"] == "queued" and status["deliveries"] == 0
    assert status["spec"]["input"] == str(source) and Path(status["spec"]["output"]).is_absolute()
    assert queue_counts(queue_url)["pending"] == 1


def test_status_of_an_unknown_job_and_an_unreachable_queue(queue_url: str) -> None:
    unknown = CliRunner().invoke(app, ["status", "0123456789abcdef", "--queue", queue_url])
    assert unknown.exit_code == ExitCode.USAGE_ERROR and "no job '0123456789abcdef'" in unknown.output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = CliRunner().invoke(app, ["status", "--queue", f"redis://:hunter2@127.0.0.1:{closed_port}/0"])
    assert unreachable.exit_code == ExitCode.QUEUE_ERROR and "ConnectionError" in unreachable.output
    assert "hunter2" not in unreachable.output
    not_redis = CliRunner().invoke(app, ["status", "--queue", "http://127.0.0.1/0"])
    assert not_redis.exit_code == ExitCode.QUEUE_ERROR and "expected a Redis URL" in not_redis.output


def test_submit_and_run_share_one_definition_of_the_job_options() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    options = {name: {param.name for param in commands[name].params} for name in ("run", "submit")}
    job_options = options["run"] - {"progress", "log_format", "debug"}
    assert job_options <= options["submit"]
    assert options["submit"] - job_options == {"queue", "allow_root", "log_format", "debug"}


def test_a_job_spec_round_trips_through_json() -> None:
    config = RunConfig(model_dir=Path("/m"), input="/d/*.parquet", output=Path("/o"), text_column="t", top_k=3, max_tokens=None)
    assert config_from_spec(json.loads(json.dumps(config_to_spec(config)))) == config
    with pytest.raises(ValueError, match="unknown field"):
        config_from_spec({**config_to_spec(config), "shiny": 1})


def test_expired_leases_are_re_delivered_then_buried(queue_url: str) -> None:
    from worker.jobqueue import JobQueue

    queue = JobQueue.connect(queue_url)
    job_id = queue.enqueue({"note": "not a real spec"})
    assert queue.claim("w1", lease_seconds=0.3) is not None
    assert queue.claim("w2", lease_seconds=0.3) is None  # claimed once only
    assert queue.reap(max_attempts=2) == []  # the lease still holds
    time.sleep(0.4)
    assert not queue.heartbeat(job_id, "w1", 0.3)  # too late: the lease expired
    assert queue.reap(max_attempts=2) == [(job_id, "queued")]
    assert not queue.complete(job_id, "w1", {})  # a stale worker cannot finish it
    claimed = queue.claim("w2", lease_seconds=0.3)
    assert claimed is not None and claimed.deliveries == 2
    assert queue.release(job_id, "w2", "stopping")  # handing back does not count an attempt
    assert queue.status(job_id).failed_attempts == 1
    queue.claim("w2", lease_seconds=0.3)
    time.sleep(0.4)
    assert queue.reap(max_attempts=2) == [(job_id, "dead")]
    status = queue.status(job_id)
    assert (status.state, status.deliveries, status.failed_attempts) == ("dead", 3, 2)
    assert "w2 stopped renewing its lease" in status.error
    assert queue.counts().dead_ids == [job_id] and queue.counts().pending == 0


def test_two_workers_one_killed_mid_job_every_job_done_exactly_once(
    tmp_path: Path, queue_url: str, model: Path, workers: list[Worker]
) -> None:
    data = tmp_path / "data"
    sources = [write_input(data / f"in-{seed}.parquet", 4000, seed=seed) for seed in (1, 2)]
    expected = [reference_output(model, source, tmp_path / f"reference-{i}") for i, source in enumerate(sources)]
    jobs = {submitted(queue_url, model, sources[i % 2], data / f"out-{i}", [data, model]): i for i in range(4)}

    workers += [Worker(name, queue_url, [data, model], tmp_path) for name in ("w1", "w2")]
    victim = workers[0]

    def victim_mid_job() -> bool:
        claims = victim.events("claimed")
        output = data / f"out-{jobs[claims[-1]['job']]}" if claims else None
        return output is not None and committed_shards(output) >= 1 and not (output / SUCCESS_FILE).exists()

    wait_until(victim_mid_job, "w1 to commit a shard of a job", workers=workers)
    victim.process.kill()
    victim.process.wait()
    killed_job = victim.events("claimed")[-1]["job"]
    killed_output = data / f"out-{jobs[killed_job]}"
    assert not (killed_output / SUCCESS_FILE).exists(), "w1 finished before it was killed: make the jobs longer"

    wait_until(lambda: all(job_status(queue_url, j)["state"] == "done" for j in jobs), "every job done", workers=workers)
    assert workers[1].stop() == 0

    for job_id, i in jobs.items():
        assert_same_rows(read_output(data / f"out-{i}"), expected[i % 2])
        status = job_status(queue_url, job_id)
        if job_id == killed_job:
            assert (status["deliveries"], status["failed_attempts"]) == (2, 1)
            assert status["summary"]["worker"] == "w2" and status["summary"]["shards_skipped"] >= 1  # resumed
        else:
            assert (status["deliveries"], status["failed_attempts"]) == (1, 0)
    assert [event["job"] for event in workers[1].events("reaped")] == [killed_job]
    done_by_w2 = workers[1].events("done")
    assert len(done_by_w2) >= 3
    # Warm sessions: one model, one session for every job this worker ran.
    assert len(workers[1].events("session_loaded")) == 1
    assert [event["session"] for event in done_by_w2[1:]] == ["warm"] * (len(done_by_w2) - 1)


def test_poison_jobs_go_to_the_dead_letter_list_and_the_worker_goes_on(
    tmp_path: Path, queue_url: str, model: Path, workers: list[Worker]
) -> None:
    data = tmp_path / "data"
    good = write_input(data / "good.parquet", 300, seed=3)
    vanishing = write_input(data / "vanishing.parquet", 300, seed=4)
    deleted_input = submitted(queue_url, model, vanishing, data / "out-vanishing", [data, model])
    vanishing.unlink()
    # Submitted under a wider root than the worker allows: the worker refuses it too.
    outside_roots = submitted(queue_url, model, good, tmp_path / "elsewhere", [tmp_path, model])
    good_job = submitted(queue_url, model, good, data / "out-good", [data, model])

    workers.append(Worker("w1", queue_url, [data, model], tmp_path, "--max-attempts", "2"))
    wait_until(lambda: job_status(queue_url, good_job)["state"] == "done", "the good job", workers=workers)
    wait_until(lambda: queue_counts(queue_url)["dead"] == 2, "two dead jobs", workers=workers)
    assert workers[0].stop() == 0

    counts = queue_counts(queue_url)
    assert sorted(counts["dead_ids"]) == sorted([deleted_input, outside_roots]) and counts["pending"] == 0
    for job_id, message in ((deleted_input, "vanishing.parquet: no such file"), (outside_roots, "outside the allowed roots")):
        status = job_status(queue_url, job_id)
        assert (status["state"], status["failed_attempts"], status["deliveries"]) == ("dead", 2, 2)
        assert message in status["error"]
    assert not (tmp_path / "elsewhere").exists()
    assert read_output(data / "out-good").num_rows == 300


def test_sigterm_hands_the_job_back_and_another_worker_finishes_it(
    tmp_path: Path, queue_url: str, model: Path, workers: list[Worker]
) -> None:
    data = tmp_path / "data"
    source = write_input(data / "in.parquet", 8000, seed=5)
    output = data / "out"
    job_id = submitted(queue_url, model, source, output, [data, model])

    workers.append(Worker("w1", queue_url, [data, model], tmp_path))
    wait_until(lambda: job_status(queue_url, job_id)["rows_to_do"] == 8000, "w1 to start the job", workers=workers)
    text = CliRunner().invoke(app, ["status", job_id, "--queue", queue_url]).stdout
    assert f"job {job_id}: running" in text and "worker w1:" in text and "of 8,000 rows of this delivery done" in text

    wait_until(lambda: committed_shards(output) >= 1, "w1 to commit a shard", workers=workers)
    assert workers[0].stop() == 0
    assert not (output / SUCCESS_FILE).exists(), "w1 finished before SIGTERM: make the job longer"
    kept = committed_shards(output)
    assert kept >= 1
    status = job_status(queue_url, job_id)
    assert (status["state"], status["deliveries"], status["failed_attempts"]) == ("queued", 1, 0)
    assert [event["job"] for event in workers[0].events("released")] == [job_id]
    assert f"stopped: job {job_id} went back to the queue" in workers[0].log.read_text()

    workers.append(Worker("w2", queue_url, [data, model], tmp_path))
    wait_until(lambda: job_status(queue_url, job_id)["state"] == "done", "w2 to finish the job", workers=workers)
    assert workers[1].stop() == 0
    status = job_status(queue_url, job_id)
    assert status["summary"]["shards_skipped"] == kept and status["deliveries"] == 2
    assert_same_rows(read_output(output), reference_output(model, source, tmp_path / "reference"))
