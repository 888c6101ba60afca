"""The Redis job queue: enqueue, claim with a lease, heartbeat, complete, fail, release, reap, status.

Keys, all under a prefix (``bertbatch:``):

- ``pending``: job ids waiting; new and retried jobs are pushed on the left, claims take from the right.
- ``processing``: job ids a worker is running.
- ``dead``: the dead-letter list, jobs that failed ``max_attempts`` times.
- ``job:ID``: a hash: ``spec`` (the RunConfig as JSON), ``state`` (queued, running, done, dead),
  ``deliveries``, ``failed_attempts``, ``worker``, ``rows_done``, ``rows_to_do``, ``provider``,
  ``summary`` (JSON), ``error`` (the last failure), ``note`` (why it was last handed back) and
  ``*_at`` timestamps (Unix seconds).
- ``lease:ID``: the id of the worker running the job, with a TTL its heartbeat keeps extending.

Every transition is one Lua script, so a job id sits in exactly one list (none once done) and has a
lease only while it is in ``processing``. A worker that dies stops renewing its lease; any worker's
reaper then moves the job back to ``pending`` (a failed attempt), or to ``dead`` after the last one.
Delivery is at least once: the output directory's resume manifest makes a re-delivery continue, not
duplicate. Single Redis instance only (the scripts touch keys they compute, which Cluster forbids).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from worker.errors import QueueError, UnknownJob

PREFIX = "bertbatch:"
DONE_TTL_SECONDS = 7 * 24 * 3600  # finished jobs' hashes are kept a week for `bertbatch status`, then expire

# A failed attempt (an error, or a lease that expired): retry at the back of the queue, or bury.
_AFTER_FAILURE = """
local function after_failure(prefix, id, now, err, max_attempts, pending, dead)
  local job = prefix .. 'job:' .. id
  local failed = redis.call('HINCRBY', job, 'failed_attempts', 1)
  if failed >= tonumber(max_attempts) then
    redis.call('HSET', job, 'state', 'dead', 'worker', '', 'error', err, 'finished_at', now, 'updated_at', now)
    redis.call('LPUSH', dead, id)
    return 'dead'
  end
  redis.call('HSET', job, 'state', 'queued', 'worker', '', 'error', err, 'updated_at', now)
  redis.call('LPUSH', pending, id)
  return 'queued'
end
"""

# BLMOVE cannot also create the lease, and a job in `processing` without a lease looks dead to a
# reaper: so the move and the lease are one script, and an idle worker polls it.
_CLAIM = """
local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
if not id then return false end
redis.call('SET', ARGV[1] .. 'lease:' .. id, ARGV[2], 'PX', ARGV[3])
local job = ARGV[1] .. 'job:' .. id
redis.call('HSET', job, 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[4], 'updated_at', ARGV[4],
           'rows_done', 0, 'rows_to_do', 0)
local deliveries = redis.call('HINCRBY', job, 'deliveries', 1)
return {id, redis.call('HGET', job, 'spec') or '', deliveries}
"""

_HEARTBEAT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'updated_at', ARGV[3], unpack(ARGV, 4))
return 1
"""

_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'done', 'worker', ARGV[1], 'summary', ARGV[4], 'finished_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""

_FAIL = _AFTER_FAILURE + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[2], 1, ARGV[2])
return after_failure(ARGV[3], ARGV[2], ARGV[4], ARGV[5], ARGV[6], KEYS[3], KEYS[4])
"""

# Back to the front of the queue without counting an attempt (a worker stopping, a locked output).
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'worker', '', 'note', ARGV[4], 'updated_at', ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[2])
return 1
"""

_REAP = _AFTER_FAILURE + """
local reaped = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. id) == 0 then
    redis.call('LREM', KEYS[1], 1, id)
    local worker = redis.call('HGET', ARGV[1] .. 'job:' .. id, 'worker') or '?'
    local err = 'worker ' .. worker .. ' stopped renewing its lease (it died, hung or lost the queue)'
    table.insert(reaped, id)
    table.insert(reaped, after_failure(ARGV[1], id, ARGV[2], err, ARGV[3], KEYS[2], KEYS[3]))
  end
end
return reaped
"""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: str
    spec: dict[str, Any] | None  # None when the stored spec is not JSON
    deliveries: int


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    deliveries: int
    failed_attempts: int
    worker: str
    rows_done: int
    rows_to_do: int
    error: str
    note: str
    spec: dict[str, Any]
    summary: dict[str, Any] | None
    times: dict[str, float]  # submitted_at, started_at, updated_at, finished_at (those set)


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
        self.pending, self.processing, self.dead = (f"{prefix}{name}" for name in ("pending", "processing", "dead"))
        self._claim = client.register_script(_CLAIM)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._complete = client.register_script(_COMPLETE)
        self._fail = client.register_script(_FAIL)
        self._release = client.register_script(_RELEASE)
        self._reap = client.register_script(_REAP)

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

    def enqueue(self, spec: dict[str, Any]) -> str:
        """Queue a job; return its id."""
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        fields = {"spec": json.dumps(spec), "state": "queued", "deliveries": 0, "failed_attempts": 0, "submitted_at": now, "updated_at": now}
        with self._errors():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.hset(self._job(job_id), mapping=fields)
            pipeline.lpush(self.pending, job_id)
            pipeline.execute()
        return job_id

    def claim(self, worker: str, lease_seconds: float) -> ClaimedJob | None:
        """Move the oldest pending job to ``processing`` under a lease held by ``worker``, or return None."""
        with self._errors():
            claimed = self._claim(keys=[self.pending, self.processing], args=[self.prefix, worker, _ms(lease_seconds), time.time()])
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
        pairs = [str(value) for item in progress.items() for value in item]
        with self._errors():
            held = self._heartbeat(keys=[self._lease(job_id), self._job(job_id)], args=[worker, _ms(lease_seconds), time.time(), *pairs])
        return bool(held)

    def complete(self, job_id: str, worker: str, summary: dict[str, Any]) -> bool:
        """Mark the job done; False when ``worker`` had lost the lease (another delivery finishes it)."""
        keys = [self._lease(job_id), self._job(job_id), self.processing]
        with self._errors():
            return bool(self._complete(keys=keys, args=[worker, job_id, time.time(), json.dumps(summary), DONE_TTL_SECONDS]))

    def fail(self, job_id: str, worker: str, error: str, max_attempts: int) -> str | None:
        """Record a failed attempt: the job's new state (queued or dead), or None if the lease was lost."""
        keys = [self._lease(job_id), self.processing, self.pending, self.dead]
        with self._errors():
            return self._fail(keys=keys, args=[worker, job_id, self.prefix, time.time(), error, max_attempts]) or None

    def release(self, job_id: str, worker: str, note: str) -> bool:
        """Put the job back at the front of the queue without counting an attempt."""
        keys = [self._lease(job_id), self._job(job_id), self.processing, self.pending]
        with self._errors():
            return bool(self._release(keys=keys, args=[worker, job_id, time.time(), note]))

    def reap(self, max_attempts: int) -> list[tuple[str, str]]:
        """Requeue (or bury) jobs whose lease expired; return (job id, new state) pairs."""
        with self._errors():
            flat = self._reap(keys=[self.processing, self.pending, self.dead], args=[self.prefix, time.time(), max_attempts])
        return list(zip(flat[::2], flat[1::2]))

    def status(self, job_id: str) -> JobStatus:
        with self._errors():
            fields = self.client.hgetall(self._job(job_id))
        if not fields:
            raise UnknownJob(f"no job {job_id!r} in {self.url} (finished jobs are forgotten after {DONE_TTL_SECONDS // 86400} days)")
        return JobStatus(
            job_id=job_id,
            state=fields.get("state", "?"),
            deliveries=int(fields.get("deliveries", 0)),
            failed_attempts=int(fields.get("failed_attempts", 0)),
            worker=fields.get("worker", ""),
            rows_done=int(fields.get("rows_done", 0)),
            rows_to_do=int(fields.get("rows_to_do", 0)),
            error=fields.get("error", ""),
            note=fields.get("note", ""),
            spec=json.loads(fields.get("spec", "{}")),
            summary=json.loads(fields["summary"]) if fields.get("summary") else None,
            times={name: float(fields[name]) for name in ("submitted_at", "started_at", "updated_at", "finished_at") if name in fields},
        )

    def counts(self) -> QueueCounts:
        with self._errors():
            pipeline = self.client.pipeline(transaction=True)
            pipeline.llen(self.pending)
            pipeline.llen(self.processing)
            pipeline.llen(self.dead)
            pipeline.lrange(self.dead, 0, 19)
            pending, processing, dead, dead_ids = pipeline.execute()
        return QueueCounts(pending, processing, dead, dead_ids)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def status_record(status: JobStatus) -> dict[str, Any]:
    """A job's status as JSON (``bertbatch status --log-format json``)."""
    return {"event": "status", "job": status.job_id, **{name: value for name, value in vars(status).items() if name != "job_id"}}


def status_text(status: JobStatus) -> str:
    lines = [f"job {status.job_id}: {status.state}"]
    spec = status.spec
    lines.append(f"  {spec.get('input')} -> {spec.get('output')} (model {spec.get('model_dir')})")
    lines.append(f"  deliveries {status.deliveries}, failed attempts {status.failed_attempts}")
    if status.state == "running":
        lines.append(f"  worker {status.worker}: {status.rows_done:,} of {status.rows_to_do:,} rows of this delivery done")
    if status.summary:
        lines.append(f"  {status.summary.get('rows', 0):,} rows in {status.summary.get('seconds', 0)} s by {status.summary.get('worker')}")
    if status.error:
        lines.append(f"  last error: {status.error}")
    if status.note:
        lines.append(f"  last handed back: {status.note}")
    return "\n".join(lines)
