"""``bertbatch serve``: a long-running worker that takes jobs from the Redis queue and runs them.

One job at a time. A housekeeping thread renews the job's lease (with its progress) and reaps
other workers' expired leases. Sessions stay warm across jobs. When ``stop`` is set (the CLI sets it
on SIGTERM), the current job stops at the next batch boundary: committed shards stay in its output,
the job goes back to the front of the queue without counting an attempt, and ``serve`` returns.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.config import Device, config_from_spec
from worker.confinement import check_confined
from worker.errors import JobLocked, QueueError, UsageError, WorkerError
from worker.job import run_job
from worker.jobqueue import ClaimedJob, JobQueue
from worker.progress import summary_record
from worker.runner import ModelDir, Runner

Log = Callable[..., None]  # log(event, **fields)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``bertbatch serve`` decides."""

    queue_url: str
    allow_roots: tuple[Path, ...]
    worker_id: str
    lease_seconds: float = 30.0
    max_attempts: int = 3
    poll_seconds: float = 1.0
    max_sessions: int = 2


@dataclass(frozen=True)
class ServeSummary:
    jobs_done: int
    failed_attempts: int
    sessions_loaded: int
    released_job: str | None  # the job handed back when stopping, if one was running


class _StopRequested(Exception):
    """Raised at a batch boundary when the worker was asked to stop."""


class _LeaseLost(Exception):
    """Raised at a batch boundary when the lease expired and the job may be running elsewhere."""


class SessionCache:
    """Warm onnxruntime sessions across jobs, keyed by model file and session options (least recently used dropped)."""

    def __init__(self, size: int, log: Log) -> None:
        self.size = size
        self.loads = 0
        self._log = log
        self._sessions: OrderedDict[tuple[object, ...], Runner] = OrderedDict()

    def get(self, model_dir: ModelDir, device: Device, threads: int | None) -> Runner:
        stat = model_dir.model_file.stat()
        key = (str(model_dir.model_file.resolve()), stat.st_mtime_ns, stat.st_size, device, threads)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        runner = Runner(model_dir, device, threads)
        self.loads += 1
        self._log("session_loaded", model=str(model_dir.path), provider=runner.provider, sessions_loaded=self.loads)
        self._sessions[key] = runner
        while len(self._sessions) > self.size:
            self._sessions.popitem(last=False)
        return runner


class _Delivery:
    """The job being run: its progress, and the checks made at every batch boundary."""

    def __init__(self, claimed: ClaimedJob, stop: threading.Event, started: Callable[[], None]) -> None:
        self.job_id = claimed.job_id
        self.rows_done = 0
        self.rows_to_do = 0
        self.provider = ""
        self.lease_lost = threading.Event()
        self.renewed_at = time.monotonic()
        self._stop = stop
        self._started = started

    def start(self, provider: str, rows_to_do: int) -> None:
        self.provider, self.rows_to_do = provider, rows_to_do
        self._started()  # publish "running, N rows to do" now rather than at the next heartbeat

    def advance(self, rows: int) -> None:
        # Called by run_job after each window is written: raising here abandons only the uncommitted shard.
        self.rows_done += rows
        if self._stop.is_set():
            raise _StopRequested
        if self.lease_lost.is_set():
            raise _LeaseLost


class _Housekeeper:
    """A thread that renews the current job's lease (storing its progress) and reaps expired leases."""

    def __init__(self, queue: JobQueue, config: ServeConfig, log: Log) -> None:
        self.queue, self.config, self.log = queue, config, log
        self.current: _Delivery | None = None
        self._lock = threading.Lock()  # held while renewing, so a detached job is never renewed or flagged
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bertbatch-housekeeper", daemon=True)

    def __enter__(self) -> _Housekeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join()

    def attach(self, delivery: _Delivery) -> None:
        self.current = delivery

    def detach(self) -> None:
        with self._lock:
            self.current = None

    def renew_now(self) -> None:
        self._wake.set()

    def check(self) -> None:
        if not self._thread.is_alive():
            raise QueueError("the housekeeping thread died (see the traceback above); stopping so leases are not left stale")

    def _loop(self) -> None:
        interval = self.config.lease_seconds / 3
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            self._renew()
            try:
                for job_id, state in self.queue.reap(self.config.max_attempts):
                    self.log("reaped", job=job_id, state=state)
            except QueueError as error:
                self.log("queue_error", error=str(error))

    def _renew(self) -> None:
        with self._lock:
            if self.current is not None:
                self._renew_lease(self.current)

    def _renew_lease(self, delivery: _Delivery) -> None:
        try:
            held = self.queue.heartbeat(
                delivery.job_id, self.config.worker_id, self.config.lease_seconds,
                rows_done=delivery.rows_done, rows_to_do=delivery.rows_to_do, provider=delivery.provider,
            )
        except QueueError as error:
            self.log("queue_error", job=delivery.job_id, error=str(error))
            held = time.monotonic() - delivery.renewed_at < self.config.lease_seconds
        else:
            delivery.renewed_at = time.monotonic() if held else delivery.renewed_at
        if not held and not delivery.lease_lost.is_set():
            self.log("lease_lost", job=delivery.job_id)
            delivery.lease_lost.set()


def serve(config: ServeConfig, stop: threading.Event, log: Log) -> ServeSummary:
    """Take jobs from the queue and run them, one at a time, until ``stop`` is set."""
    _check_serve_options(config)
    queue = JobQueue.connect(config.queue_url)
    sessions = SessionCache(config.max_sessions, log)
    done = failed = 0
    released: str | None = None
    log("serving", worker=config.worker_id, queue=queue.url, roots=[str(root) for root in config.allow_roots])
    with _Housekeeper(queue, config, log) as housekeeper:
        while not stop.is_set():
            housekeeper.check()
            try:
                claimed = queue.claim(config.worker_id, config.lease_seconds)
            except QueueError as error:
                log("queue_error", error=str(error))
                stop.wait(max(config.poll_seconds, 5.0))
                continue
            if claimed is None:
                stop.wait(config.poll_seconds)
                continue
            delivery = _Delivery(claimed, stop, housekeeper.renew_now)
            outcome = _run_delivery(claimed, delivery, housekeeper, queue, sessions, config, log)
            if outcome == "stopped":
                released = claimed.job_id
                break
            if outcome == "locked":
                stop.wait(config.poll_seconds)
            done += outcome == "done"
            failed += outcome == "failed"
    log("stopped", worker=config.worker_id, jobs_done=done, failed_attempts=failed, released=released)
    return ServeSummary(done, failed, sessions.loads, released)


def _check_serve_options(config: ServeConfig) -> None:
    if not config.allow_roots:
        raise UsageError("serve needs at least one --allow-root: the directories queued jobs may read and write")
    missing = [str(root) for root in config.allow_roots if not root.is_dir()]
    if missing:
        raise UsageError(f"--allow-root {', '.join(missing)}: not a directory")
    if config.lease_seconds <= 0 or config.poll_seconds <= 0:
        raise UsageError("--lease-seconds and --poll-seconds must be positive")
    if config.max_attempts < 1:
        raise UsageError(f"--max-attempts must be at least 1, got {config.max_attempts}")


def _run_delivery(
    claimed: ClaimedJob,
    delivery: _Delivery,
    housekeeper: _Housekeeper,
    queue: JobQueue,
    sessions: SessionCache,
    config: ServeConfig,
    log: Log,
) -> str:
    """Run one delivered job and record its outcome in the queue: done, failed, stopped, locked or lost."""
    worker, job_id = config.worker_id, claimed.job_id
    log("claimed", job=job_id, delivery=claimed.deliveries)
    loads_before = sessions.loads
    housekeeper.attach(delivery)
    try:
        try:
            if claimed.spec is None:
                raise ValueError("the job's spec is missing or not JSON")
            job = config_from_spec(claimed.spec)
            check_confined(job, config.allow_roots)
            summary = run_job(job, progress=delivery.advance, on_start=delivery.start, make_runner=sessions.get)
        finally:
            housekeeper.detach()  # before the outcome is recorded: no heartbeat may race it
    except _StopRequested:
        _record(log, queue.release, job_id, worker, f"released by {worker}, which was stopping")
        log("released", job=job_id, rows_done=delivery.rows_done)
        return "stopped"
    except _LeaseLost:
        log("abandoned", job=job_id, reason="lease lost; another delivery resumes it from the committed shards")
        return "lost"
    except JobLocked as error:
        # Another process writes this output (a stale delivery still stopping, or a manual run): try later.
        _record(log, queue.release, job_id, worker, str(error))
        log("locked", job=job_id, error=str(error))
        return "locked"
    except KeyboardInterrupt:
        # A second signal: leave at once, but hand the job back rather than wait for the lease to expire.
        _record(log, queue.release, job_id, worker, f"released by {worker}, which was interrupted")
        raise
    except Exception as error:  # any failure is the job's: recorded in the queue (a poison job must not stop the worker)
        message = str(error) if isinstance(error, WorkerError) else f"{type(error).__name__}: {error}"
        state = _record(log, queue.fail, job_id, worker, message, config.max_attempts)
        log("failed", job=job_id, state=state, error=message)
        return "failed"
    session = "none" if summary.already_complete else "loaded" if sessions.loads > loads_before else "warm"
    record = {**summary_record(summary), "worker": worker, "session": session}
    completed = _record(log, queue.complete, job_id, worker, record)
    log("done", job=job_id, rows=summary.rows, seconds=round(summary.seconds, 3), session=session, recorded=bool(completed))
    return "done"


def _record(log: Log, operation: Callable[..., object], *args: object) -> object:
    """A queue update after a job; if Redis is unreachable the lease expires and the job is re-delivered."""
    try:
        return operation(*args)
    except QueueError as error:
        log("queue_error", error=str(error))
        return None
