"""The queue on a bad day: a worker frozen past its lease, Redis restarts with and without an
append-only file, an outage longer than the lease, and job records damaged by hand.

Real ``redis-server`` processes (one per test where the test restarts it) and real ``bertbatch
serve`` processes, as in ``test_queue.py``, whose helpers these tests share.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_queue import (  # noqa: F401  (fixtures are found by name)
    LEASE_SECONDS,
    Worker,
    assert_same_rows,
    committed_shards,
    job_status,
    model,
    queue_counts,
    queue_url,
    read_output,
    redis_server,
    reference_output,
    submitted,
    wait_until,
    workers,
    write_input,
)
from typer.testing import CliRunner

from worker.cli import app
from worker.exit_codes import ExitCode
from worker.jobqueue import JobQueue


class RedisServer:
    """A redis-server of its own, on a fixed port and directory, so a test can stop and restart it."""

    def __init__(self, directory: Path, *persistence: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                        "--dir", str(directory), *persistence]  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file (if any) and exits."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=20)

    def restart(self, after_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(after_seconds)
        self.start()


@pytest.fixture
def own_redis(tmp_path: Path, redis_server: str) -> Iterator[Callable[..., RedisServer]]:  # redis_server: skips without Redis
    servers: list[RedisServer] = []

    def start(*persistence: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis-{len(servers)}", *persistence))
        return servers[-1]

    yield start
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


DURABLE = ("--appendonly", "yes", "--save", "")
VOLATILE = ("--appendonly", "no", "--save", "")


def test_a_locked_job_backs_off_and_the_jobs_behind_it_run(
    tmp_path: Path, queue_url: str, model: Path, workers: list[Worker]
) -> None:
    data = tmp_path / "data"
    long_source = write_input(data / "long.parquet", 8000, seed=5)
    small_source = write_input(data / "small.parquet", 300, seed=6)
    long_output, small_output = data / "out-long", data / "out-small"
    long_job = submitted(queue_url, model, long_source, long_output, [data, model])
    workers.append(Worker("w1", queue_url, [data, model], tmp_path))
    wait_until(lambda: committed_shards(long_output) >= 1, "w1 to commit a shard", workers=workers)
    workers.append(Worker("w2", queue_url, [data, model], tmp_path))
    frozen = workers[0]
    frozen.process.send_signal(signal.SIGSTOP)  # alive, holding the output's lock, renewing nothing
    try:
        wait_until(lambda: bool(workers[1].events("locked")), "w2 to reap the frozen lease and find the output locked", workers=workers)
        small_job = submitted(queue_url, model, small_source, small_output, [data, model])
        wait_until(lambda: job_status(queue_url, small_job)["state"] == "done", "the job behind the locked one", workers=workers, timeout=60)
        time.sleep(2 * LEASE_SECONDS)  # a few more rounds of the locked job backing off
        status = job_status(queue_url, long_job)
        assert status["failed_attempts"] == 1, status  # the frozen worker's reaped lease; never the lock
        assert status["deliveries"] <= 8, status  # backing off, not re-claimed on every poll
        assert "locked by pid" in status["note"] and status["state"] in ("queued", "running")
        locked = workers[1].events("locked")
        assert locked and all(event["job"] == long_job for event in locked)
        assert [event["retry_in"] for event in locked[:3]] == [0.2, 0.4, 0.8]  # doubling from --poll-seconds
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    # Thawed, w1 finds its lease gone and abandons the job (or finishes it unrecorded); a later try resumes it.
    wait_until(lambda: job_status(queue_url, long_job)["state"] == "done", "the locked job to finish", workers=workers)
    unrecorded = [event["job"] for event in frozen.events("done") if not event["recorded"]]
    assert [event["job"] for event in frozen.events("abandoned")] + unrecorded == [long_job]
    status = job_status(queue_url, long_job)
    assert status["failed_attempts"] == 1 and status["summary"]["shards_skipped"] >= 1
    assert_same_rows(read_output(long_output), reference_output(model, long_source, tmp_path / "reference"))
    assert queue_counts(queue_url)["pending"] == 0


def test_a_redis_outage_longer_than_the_lease_is_not_a_failed_attempt(
    tmp_path: Path, own_redis: Callable[..., RedisServer], model: Path, workers: list[Worker]
) -> None:
    server = own_redis(*DURABLE)
    data = tmp_path / "data"
    source = write_input(data / "in.parquet", 8000, seed=7)
    output = data / "out"
    job_id = submitted(server.url, model, source, output, [data, model])
    workers.append(Worker("w1", server.url, [data, model], tmp_path))
    wait_until(lambda: job_status(server.url, job_id)["rows_to_do"] == 8000, "w1 to start the job", workers=workers)
    server.restart(after_seconds=2.5 * LEASE_SECONDS)  # every lease in Redis lapses meanwhile
    wait_until(lambda: job_status(server.url, job_id)["state"] == "done", "the job to finish", workers=workers)
    assert workers[0].stop() == 0
    status = job_status(server.url, job_id)
    assert (status["deliveries"], status["failed_attempts"], status["error"]) == (1, 0, ""), status
    assert workers[0].events("queue_error") and not workers[0].events("reaped") and not workers[0].events("abandoned")
    assert_same_rows(read_output(output), reference_output(model, source, tmp_path / "reference"))


def test_serve_refuses_a_redis_that_loses_jobs_on_a_restart(tmp_path: Path, own_redis: Callable[..., RedisServer], model: Path) -> None:
    volatile = own_redis(*VOLATILE)
    data = tmp_path / "data"
    serve = ["serve", "--queue", volatile.url, "--allow-root", str(data), "--lease-seconds", "3", "--log-format", "json"]
    data.mkdir()
    refused = subprocess.run([sys.executable, "-m", "worker.cli", *serve], capture_output=True, text=True, timeout=120)
    assert refused.returncode == ExitCode.QUEUE_ERROR, refused.stderr
    assert "appendonly is 'no'" in refused.stderr and "--allow-volatile-redis" in refused.stderr

    source = write_input(data / "in.parquet", 10, seed=8)
    job_id = submitted(volatile.url, model, source, data / "out", [data, model])
    volatile.restart()
    lost = CliRunner().invoke(app, ["status", job_id, "--queue", volatile.url])
    assert lost.exit_code == ExitCode.USAGE_ERROR
    assert f"no job '{job_id}'" in lost.output and "this Redis holds no bertbatch queue" in lost.output
    # Once a worker (here one that accepts the risk) has started the queue again, the job is older than it.
    time.sleep(1.1)  # job ids carry whole seconds
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", *serve, "--allow-volatile-redis"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: JobQueue.connect(volatile.url).client.exists("bertbatch:started_at") == 1, "the worker to start", workers=[])
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0 and '"event": "volatile_redis"' in stderr
    lost = CliRunner().invoke(app, ["status", job_id, "--queue", volatile.url])
    assert lost.exit_code == ExitCode.USAGE_ERROR and "it lost its data (restarted without persistence, or flushed)" in lost.output

    durable = own_redis(*DURABLE)
    kept = submitted(durable.url, model, source, data / "out", [data, model])
    durable.restart()
    assert job_status(durable.url, kept)["state"] == "queued"
    assert queue_counts(durable.url)["pending"] == 1
    old = f"{int(time.time()) - 8 * 86400:08x}00000000"
    expired = CliRunner().invoke(app, ["status", old, "--queue", durable.url])
    assert expired.exit_code == ExitCode.USAGE_ERROR and "it expired (finished jobs are forgotten after 7 days)" in expired.output
    recent = f"{int(time.time()):08x}00000000"  # after this queue began
    elsewhere = CliRunner().invoke(app, ["status", recent, "--queue", durable.url])
    assert elsewhere.exit_code == ExitCode.USAGE_ERROR and "submitted to another --queue or database" in elsewhere.output


def test_damaged_job_records_are_buried_with_the_reason_never_left_in_no_list(queue_url: str) -> None:
    queue = JobQueue.connect(queue_url)
    client = queue.client

    def lists_holding(job_id: str) -> list[str]:
        found = [name for name in ("pending", "processing", "dead") if job_id in client.lrange(f"bertbatch:{name}", 0, -1)]
        return found + (["delayed"] if client.zscore("bertbatch:delayed", job_id) is not None else [])

    # fail(): a counter that is not a count must not leave the job half-moved.
    failing = queue.enqueue({"note": "a spec"})
    assert queue.claim("w1", lease_seconds=30) is not None
    client.hset(f"bertbatch:job:{failing}", "failed_attempts", "two")
    assert queue.fail(failing, "w1", "boom", max_attempts=3) == "dead"
    assert lists_holding(failing) == ["dead"] and not client.exists(f"bertbatch:lease:{failing}")
    status = CliRunner().invoke(app, ["status", failing, "--queue", queue_url])
    assert status.exit_code == 0, status.output
    assert f"job {failing}: dead" in status.output and "failed_attempts: 'two' is not a number" in status.output
    assert "boom; not retried: failed_attempts is \"two\", not a count" in status.output

    # reap(): the same for an expired lease.
    reaped = queue.enqueue({"note": "a spec"})
    assert queue.claim("w1", lease_seconds=0.2) is not None
    client.hset(f"bertbatch:job:{reaped}", "failed_attempts", "1.5")
    time.sleep(0.3)
    assert queue.reap(max_attempts=3) == [(reaped, "dead")]
    assert lists_holding(reaped) == ["dead"]

    # claim(): a damaged job at the head of the queue is buried, and the next one is claimed.
    damaged, good = queue.enqueue({"note": "a spec"}), queue.enqueue({"note": "a spec"})
    client.hset(f"bertbatch:job:{damaged}", "deliveries", "-")
    not_a_hash = queue.enqueue({"note": "a spec"})
    client.delete(f"bertbatch:job:{not_a_hash}")
    client.set(f"bertbatch:job:{not_a_hash}", "junk")
    claimed = queue.claim("w2", lease_seconds=30)
    assert claimed is not None and claimed.job_id == good
    assert lists_holding(damaged) == ["dead"] and lists_holding(good) == ["processing"]
    assert "not run: deliveries is \"-\", not a count" in queue.status(damaged).error
    assert queue.claim("w2", lease_seconds=30) is None and lists_holding(not_a_hash) == ["dead"]
    status = CliRunner().invoke(app, ["status", not_a_hash, "--queue", queue_url])
    assert status.exit_code == 0 and "damaged record: its record is a string, not a hash" in status.output

    # A queue key of the wrong type: the script refuses before writing anything.
    client.delete("bertbatch:dead")
    client.set("bertbatch:dead", "junk")
    before = client.lrange("bertbatch:processing", 0, -1)
    with pytest.raises(Exception, match="bertbatch:dead is a string, expected a list"):
        queue.fail(good, "w2", "boom", max_attempts=3)
    assert client.lrange("bertbatch:processing", 0, -1) == before and client.get(f"bertbatch:lease:{good}") == "w2"
