"""``bertbatch serve``: a long-running worker that takes jobs from the Redis queue and runs them.

One job at a time. A housekeeping thread renews the job's lease (with its progress) and reaps
other workers' expired leases. Sessions stay warm across jobs. When ``stop`` is set (the CLI sets it
on SIGTERM), the current job stops at the next batch boundary: committed shards stay in its output,
the job goes back to the front of the queue without counting an attempt, and ``serve`` returns.

An outage of the queue is nobody's failed attempt: a worker keeps running its job while Redis is
unreachable (its output lock keeps any second delivery out), takes its lapsed lease back when Redis
returns, and retries recording the outcome; reapers wait a lease after an outage before reaping.
A job whose output is locked backs off behind the other jobs, without counting an attempt.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.config import Device, config_from_spec, with_absolute_paths
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
    allow_volatile_redis: bool = False  # run on a Redis that would lose the queue on a restart
    overwrite_any_file: bool = False  # a queued --overwrite may delete files no bertbatch job wrote


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
        self.queue_was_out = False  # the last renewal failed: take the lease back once the queue answers
        self.forgotten = False  # the queue lost its record of the job (a Redis without persistence)
        self.stop = stop
        self._started = started

    def start(self, provider: str, rows_to_do: int) -> None:
        self.provider, self.rows_to_do = provider, rows_to_do
        self._started()  # publish "running, N rows to do" now rather than at the next heartbeat

    def advance(self, rows: int) -> None:
        # Called by run_job after each window is written: raising here abandons only the uncommitted shard.
        self.rows_done += rows
        if self.stop.is_set():
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
        self._reachable_since: float | None = None  # monotonic time since which every call reached the queue
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

    def queue_out(self) -> None:
        """Note that a call to the queue failed (from any thread)."""
        self._reachable_since = None

    def _queue_answered(self) -> None:
        if self._reachable_since is None:
            self._reachable_since = time.monotonic()

    def _loop(self) -> None:
        interval = self.config.lease_seconds / 3
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            self._renew()
            try:
                if self._steady():
                    for job_id, state in self.queue.reap(self.config.max_attempts):
                        self.log("reaped", job=job_id, state=state)
            except QueueError as error:
                self.queue_out()
                self.log("queue_error", error=str(error))

    def _steady(self) -> bool:
        # Leases lapse while the queue is out (a restart, a network outage), and their workers take
        # them back once it answers: reaping before then would count the outage as the jobs' failure.
        # So reap only after reaching the queue for a whole lease, on a server up for a whole lease.
        seconds_up = self.queue.seconds_up()
        self._queue_answered()
        assert self._reachable_since is not None
        lease = self.config.lease_seconds
        return seconds_up >= lease and time.monotonic() - self._reachable_since >= lease

    def _renew(self) -> None:
        with self._lock:
            if self.current is not None:
                self._renew_lease(self.current)

    def _renew_lease(self, delivery: _Delivery) -> None:
        try:
            held = self.queue.renew(
                delivery.job_id, self.config.worker_id, self.config.lease_seconds, take_back=delivery.queue_was_out,
                rows_done=delivery.rows_done, rows_to_do=delivery.rows_to_do, provider=delivery.provider,
            )  # fmt: skip
        except QueueError as error:
            # Keep running: while the queue is out nobody can take the job, and the output lock
            # keeps out a delivery that a reaper on the other side of a partition might start.
            self.queue_out()
            self.log("queue_error", job=delivery.job_id, error=str(error))
            delivery.queue_was_out = True
            return
        self._queue_answered()
        if delivery.queue_was_out:
            self.log("queue_back", job=delivery.job_id, lease=held)
            delivery.queue_was_out = False
        if held == "forgotten" and not delivery.forgotten:
            # Nobody else will run it: finish it, so its output is complete even if the queue cannot say so.
            self.log("forgotten", job=delivery.job_id, reason="the queue has no record of the job (Redis lost its data?); finishing it anyway")
            delivery.forgotten = True
        elif held == "lost" and not delivery.lease_lost.is_set():
            self.log("lease_lost", job=delivery.job_id)
            delivery.lease_lost.set()


def serve(config: ServeConfig, stop: threading.Event, log: Log) -> ServeSummary:
    """Take jobs from the queue and run them, one at a time, until ``stop`` is set."""
    _check_serve_options(config)
    queue = JobQueue.connect(config.queue_url)
    _check_persistence(queue, config, log)
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
                housekeeper.queue_out()
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


def _check_persistence(queue: JobQueue, config: ServeConfig, log: Log) -> None:
    problem = queue.persistence_problem()
    if problem is not None:
        if not config.allow_volatile_redis:
            raise QueueError(
                f"queue {queue.url}: {problem}, so a restart of this Redis loses every queued and running job; "
                "set `appendonly yes` in its configuration (see the README's queue section), or pass "
                "--allow-volatile-redis to run anyway"
            )
        log("volatile_redis", queue=queue.url, problem=problem, warning="a restart of this Redis loses every queued and running job")
    queue.mark_started()


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

    def record(operation: Callable[..., object], *args: object) -> object:
        take_back = functools.partial(queue.renew, job_id, worker, config.lease_seconds, take_back=True)
        return _record(log, delivery.stop, take_back, delivery.queue_was_out, operation, job_id, worker, *args)

    try:
        try:
            if claimed.spec is None:
                raise ValueError("the job's spec is missing or not JSON")
            job = with_absolute_paths(config_from_spec(claimed.spec))  # checked and used as this one value
            check_confined(job, config.allow_roots)
            summary = run_job(
                job, progress=delivery.advance, on_start=delivery.start, make_runner=sessions.get, overwrite_any_file=config.overwrite_any_file
            )
        finally:
            housekeeper.detach()  # before the outcome is recorded: no heartbeat may race it
    except _StopRequested:
        record(queue.release, f"released by {worker}, which was stopping")
        log("released", job=job_id, rows_done=delivery.rows_done)
        return "stopped"
    except _LeaseLost:
        log("abandoned", job=job_id, reason="lease lost; another delivery resumes it from the committed shards")
        return "lost"
    except JobLocked as error:
        # Another process writes this output (a stale delivery still stopping, or a manual run): try
        # again later, behind the other jobs, so that a long-held lock does not stall the queue.
        delay = record(queue.back_off, str(error), config.poll_seconds, config.lease_seconds)
        log("locked", job=job_id, error=str(error), retry_in=delay)
        return "locked"
    except KeyboardInterrupt:
        # A second signal: leave at once, but hand the job back rather than wait for the lease to expire.
        record(queue.release, f"released by {worker}, which was interrupted")
        raise
    except Exception as error:  # any failure is the job's: recorded in the queue (a poison job must not stop the worker)
        message = str(error) if isinstance(error, WorkerError) else f"{type(error).__name__}: {error}"
        state = record(queue.fail, message, config.max_attempts)
        log("failed", job=job_id, state=state, error=message)
        return "failed"
    session = "none" if summary.already_complete else "loaded" if sessions.loads > loads_before else "warm"
    completed = record(queue.complete, {**summary_record(summary), "worker": worker, "session": session})
    log("done", job=job_id, rows=summary.rows, seconds=round(summary.seconds, 3), session=session, recorded=bool(completed))
    return "done"


RECORD_RETRY_SECONDS = 2.0


def _record(
    log: Log, stop: threading.Event, take_back: Callable[[], object], queue_was_out: bool, operation: Callable[..., object], *args: object
) -> object:
    """A queue update after a job, retried while the queue is out, until it answers or ``stop`` is set.

    The outage is not the job's failure: once the queue answers, the lease that lapsed meanwhile is
    taken back (if nobody else took the job) and the outcome recorded. When stopping, one try only:
    the lease then expires and the job is re-delivered.
    """
    while True:
        try:
            if queue_was_out:
                take_back()
            return operation(*args)
        except QueueError as error:
            log("queue_error", error=str(error))
            queue_was_out = True
            if stop.wait(RECORD_RETRY_SECONDS) or stop.is_set():
                return None
