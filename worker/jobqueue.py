"""The Redis job queue: enqueue, claim with a lease, heartbeat, complete, fail, release, reap, status.

Keys, all under a prefix (``bertbatch:``):

- ``pending``: job ids waiting; new and retried jobs are pushed on the left, claims take from the right.
- ``delayed``: a sorted set of job ids whose output was locked, scored by when they may run again;
  a claim first moves the due ones to the back of ``pending``.
- ``processing``: job ids a worker is running.
- ``dead``: the dead-letter list, jobs that failed ``max_attempts`` times.
- ``job:ID``: a hash: ``spec`` (the RunConfig as JSON), ``state`` (queued, running, done, dead),
  ``deliveries``, ``failed_attempts``, ``locked_deliveries``, ``worker``, ``rows_done``, ``rows_to_do``,
  ``provider``, ``summary`` (JSON), ``error`` (the last failure), ``note`` (why it was last handed
  back) and ``*_at`` timestamps (Unix seconds).
- ``lease:ID``: the id of the worker running the job, with a TTL its heartbeat keeps extending.
- ``started_at``: when this Redis first held a bertbatch queue, to tell a lost job from an expired one.

Every transition is one Lua script (``worker.queue_scripts``), so a job id sits in exactly one list
or set (none once done). A worker that dies stops renewing its lease; any worker's reaper then moves
the job back to ``pending`` (a failed attempt), or to ``dead`` after the last one. Delivery is at
least once: the output directory's resume manifest makes a re-delivery continue, not duplicate.
Single Redis instance only (the scripts touch keys they compute, which Cluster forbids), and one
that persists its data (``appendonly yes``): ``persistence_problem`` says why one does not.

Job ids are 16 hex digits: the submission time in Unix seconds (8 digits), then 8 random ones.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from worker import queue_scripts as scripts
from worker.errors import QueueError, UnknownJob
from worker.queue_status import JobStatus, damaged_status, parse_status, status_record, status_text, unknown_job_message

PREFIX = "bertbatch:"
DONE_TTL_SECONDS = 7 * 24 * 3600  # finished jobs' hashes are kept a week for `bertbatch status`, then expire

Held = Literal["held", "lost", "forgotten"]  # a heartbeat's answer

__all__ = ["ClaimedJob", "Held", "JobQueue", "JobStatus", "QueueCounts", "status_record", "status_text"]

@dataclass(frozen=True)
class ClaimedJob:
    job_id: str
    spec: dict[str, Any] | None  # None when the stored spec is not JSON
    deliveries: int


@dataclass(frozen=True)
class QueueCounts:
    pending: int
    processing: int
    dead: int
    dead_ids: list[str]  # the most recent first, at most 20


class JobQueue:
    """The queue's operations; every state change is atomic in Redis."""

    def __init__(self, client: Any, url: str, prefix: str = PREFIX) -> None:
        self.client = client
        self.url = _without_password(url)  # for messages and logs
        self.prefix = prefix
        names = ("pending", "processing", "dead", "delayed")
        self.pending, self.processing, self.dead, self.delayed = (f"{prefix}{name}" for name in names)
        self._started_key = f"{prefix}started_at"
        self._claim = client.register_script(scripts.CLAIM)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._complete = client.register_script(scripts.COMPLETE)
        self._fail = client.register_script(scripts.FAIL)
        self._release = client.register_script(scripts.RELEASE)
        self._back_off = client.register_script(scripts.BACK_OFF)
        self._reap = client.register_script(scripts.REAP)

    @classmethod
    def connect(cls, url: str, prefix: str = PREFIX) -> JobQueue:
        """Connect to ``redis://HOST:PORT/DB`` (or ``rediss://``, ``unix://``) and check it answers."""
        try:
            import redis
        except ImportError as error:
            raise QueueError("the queue needs the redis package: pip install 'bertbatch[queue]'") from error
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise QueueError(f"--queue {_without_password(url)}: expected a Redis URL such as redis://localhost:6379/0")
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, health_check_interval=30)
        queue = cls(client, url, prefix)
        with queue._errors():
            client.ping()
        return queue

    @contextmanager
    def _errors(self) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.RedisError as error:
            raise QueueError(f"queue {self.url}: {type(error).__name__}: {error}") from error

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def persistence_problem(self) -> str | None:
        """Why a restart of this Redis would lose the queue, or None when it keeps an append-only file.

        Reads ``CONFIG GET`` (``INFO persistence`` where a managed Redis disables CONFIG).
        """
        import redis

        with self._errors():
            try:
                config = self.client.config_get("appendonly")
                config.update(self.client.config_get("save"))
            except redis.ResponseError:  # CONFIG renamed or disabled
                info = self.client.info("persistence")
                if int(info.get("aof_enabled", 0)) == 1:
                    return None
                return "INFO persistence reports aof_enabled:0"
        if config.get("appendonly") == "yes":
            return None
        snapshots = config.get("save") or ""
        found = f"snapshots only (save '{snapshots}'): changes since the last one are lost" if snapshots else "no snapshots either (save '')"
        return f"appendonly is {config.get('appendonly', '?')!r}, {found}"

    def seconds_up(self) -> float:
        """How long the Redis server has been running (its leases' clock restarted with it)."""
        with self._errors():
            return float(self.client.info("server").get("uptime_in_seconds", 0))

    def mark_started(self) -> None:
        """Record when this Redis first held the queue (kept if already set)."""
        with self._errors():
            self.client.set(self._started_key, f"{time.time():.3f}", nx=True)

    def enqueue(self, spec: dict[str, Any]) -> str:
        """Queue a job; return its id."""
        now = time.time()
        job_id = f"{int(now):08x}{uuid.uuid4().hex[:8]}"
        fields = {"spec": json.dumps(spec), "state": "queued", "deliveries": 0, "failed_attempts": 0, "submitted_at": now, "updated_at": now}
        with self._errors():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.set(self._started_key, f"{now:.3f}", nx=True)
            pipeline.hset(self._job(job_id), mapping=fields)
            pipeline.lpush(self.pending, job_id)
            pipeline.execute()
        return job_id

    def claim(self, worker: str, lease_seconds: float) -> ClaimedJob | None:
        """Move the oldest pending job to ``processing`` under a lease held by ``worker``, or return None.

        Jobs with a damaged record met on the way are buried in ``dead``, with the reason as their error.
        """
        keys = [self.pending, self.processing, self.delayed, self.dead]
        with self._errors():
            claimed = self._claim(keys=keys, args=[self.prefix, worker, _ms(lease_seconds), time.time()])
        if not claimed:
            return None
        job_id, spec, deliveries = claimed
        try:
            parsed = json.loads(spec)
        except ValueError:
            parsed = None
        return ClaimedJob(job_id, parsed if isinstance(parsed, dict) else None, int(deliveries))

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float, **progress: object) -> bool:
        """Extend the lease and store progress; False when ``worker`` no longer holds the lease."""
        return self.renew(job_id, worker, lease_seconds, take_back=False, **progress) == "held"

    def renew(self, job_id: str, worker: str, lease_seconds: float, take_back: bool, **progress: object) -> Held:
        """Extend the lease and store progress: held, lost (another delivery may run it) or forgotten.

        ``take_back``: after an outage of the queue, also renew a lease that lapsed meanwhile if the
        job is still recorded as running on ``worker``.
        """
        pairs = [str(value) for item in progress.items() for value in item]
        args = [worker, _ms(lease_seconds), time.time(), int(take_back), *pairs]
        with self._errors():
            held = self._heartbeat(keys=[self._lease(job_id), self._job(job_id)], args=args)
        return "held" if held == 1 else "forgotten" if held == -1 else "lost"

    def complete(self, job_id: str, worker: str, summary: dict[str, Any]) -> bool:
        """Mark the job done; False when ``worker`` had lost the lease (another delivery finishes it)."""
        keys = [self._lease(job_id), self._job(job_id), self.processing]
        with self._errors():
            return bool(self._complete(keys=keys, args=[worker, job_id, time.time(), json.dumps(summary), DONE_TTL_SECONDS]))

    def fail(self, job_id: str, worker: str, error: str, max_attempts: int) -> str | None:
        """Record a failed attempt: the job's new state (queued or dead), or None if the lease was lost."""
        keys = [self._lease(job_id), self._job(job_id), self.processing, self.pending, self.dead]
        with self._errors():
            return self._fail(keys=keys, args=[worker, job_id, self.prefix, time.time(), error, max_attempts]) or None

    def release(self, job_id: str, worker: str, note: str) -> bool:
        """Put the job back at the front of the queue without counting an attempt."""
        keys = [self._lease(job_id), self._job(job_id), self.processing, self.pending]
        with self._errors():
            return bool(self._release(keys=keys, args=[worker, job_id, time.time(), note]))

    def back_off(self, job_id: str, worker: str, note: str, first_delay: float, longest_delay: float) -> float | None:
        """Hand a job back for later, behind the jobs waiting then, without counting an attempt.

        The delay doubles with each such hand-back, from ``first_delay`` up to ``longest_delay``
        seconds. Returns the delay, or None if ``worker`` had lost the lease.
        """
        keys = [self._lease(job_id), self._job(job_id), self.processing, self.delayed]
        with self._errors():
            delay = self._back_off(keys=keys, args=[worker, job_id, time.time(), note, first_delay, longest_delay])
        return float(delay) if delay else None

    def reap(self, max_attempts: int) -> list[tuple[str, str]]:
        """Requeue (or bury) jobs whose lease expired; return (job id, new state) pairs."""
        with self._errors():
            flat = self._reap(keys=[self.processing, self.pending, self.dead], args=[self.prefix, time.time(), max_attempts])
        return list(zip(flat[::2], flat[1::2]))

    def status(self, job_id: str) -> JobStatus:
        """A job's record; ``UnknownJob`` says whether it expired or this Redis never (or no longer) held it."""
        with self._errors():
            kind = self.client.type(self._job(job_id))
            fields = self.client.hgetall(self._job(job_id)) if kind == "hash" else {}
            started = self.client.get(self._started_key)
        if kind not in ("hash", "none"):
            return damaged_status(job_id, f"its record is a {kind}, not a hash")
        if not fields:
            raise UnknownJob(unknown_job_message(job_id, self.url, started, time.time(), DONE_TTL_SECONDS))
        return parse_status(job_id, fields)

    def counts(self) -> QueueCounts:
        """How many jobs wait (``pending`` counts those backing off too), run and lie dead."""
        with self._errors():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.llen(self.pending)
            pipeline.zcard(self.delayed)
            pipeline.llen(self.processing)
            pipeline.llen(self.dead)
            pipeline.lrange(self.dead, 0, 19)
            pending, delayed, processing, dead, dead_ids = pipeline.execute()
        return QueueCounts(pending + delayed, processing, dead, dead_ids)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
