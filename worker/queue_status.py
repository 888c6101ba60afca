"""What ``bertbatch status JOB`` reports: a job's record read leniently, and why a job is unknown."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

TIMES = ("submitted_at", "started_at", "updated_at", "finished_at")
ID_EPOCH = 1_700_000_000  # no job id names an earlier submission time (November 2023)


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
    damaged: list[str] = field(default_factory=list)  # fields that could not be read, each "name: why"


def parse_status(job_id: str, fields: dict[str, str]) -> JobStatus:
    """A job hash as a status; a field that does not parse is listed in ``damaged``, not raised."""
    damaged: list[str] = []

    def number(name: str, kind: type[int] | type[float]) -> Any:
        value = fields.get(name)
        if value is None:
            return 0
        try:
            return kind(value)
        except ValueError:
            damaged.append(f"{name}: {value!r} is not a number")
            return 0

    def parsed(name: str, default: Any) -> Any:
        value = fields.get(name)
        if not value:
            return default
        try:
            loaded = json.loads(value)
        except ValueError:
            damaged.append(f"{name}: not JSON")
            return default
        if not isinstance(loaded, dict):
            damaged.append(f"{name}: not a JSON object")
            return default
        return loaded

    return JobStatus(
        job_id=job_id,
        state=fields.get("state", "?"),
        deliveries=number("deliveries", int),
        failed_attempts=number("failed_attempts", int),
        worker=fields.get("worker", ""),
        rows_done=number("rows_done", int),
        rows_to_do=number("rows_to_do", int),
        error=fields.get("error", ""),
        note=fields.get("note", ""),
        spec=parsed("spec", {}),
        summary=parsed("summary", None),
        times={name: number(name, float) for name in TIMES if name in fields},
        damaged=damaged,
    )


def damaged_status(job_id: str, why: str) -> JobStatus:
    return JobStatus(job_id, "?", 0, 0, "", 0, 0, "", "", {}, None, {}, [why])


def submitted_at(job_id: str) -> float | None:
    """The submission time a job id carries, or None for an id this queue does not issue."""
    if len(job_id) != 16:
        return None
    try:
        seconds = int(job_id[:8], 16)
        int(job_id[8:], 16)
    except ValueError:
        return None
    return float(seconds) if ID_EPOCH <= seconds <= time.time() + 86400 else None


def unknown_job_message(job_id: str, url: str, queue_started: str | None, now: float, kept_seconds: int) -> str:
    """Why ``url`` has no record of ``job_id``: expired, lost by this Redis, or never submitted to it."""
    head = f"no job {job_id!r} in {url}"
    submitted = submitted_at(job_id)
    if submitted is None:
        return f"{head}: not an id `bertbatch submit` prints (16 hex digits, the first 8 the submission time)"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(submitted))
    if now - submitted > kept_seconds:
        return f"{head}: submitted {when}, more than {kept_seconds // 86400} days ago; it expired (finished jobs are forgotten after {kept_seconds // 86400} days)"
    if queue_started is None:
        return (
            f"{head}: submitted {when}, but this Redis holds no bertbatch queue at all: a different server or "
            "database than the job was submitted to, or it lost its data (restarted without persistence, or flushed)"
        )
    if float(queue_started) > submitted + 1:
        began = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(queue_started)))
        return (
            f"{head}: unknown to this Redis, whose queue began {began}, after the job was submitted ({when}): "
            "it lost its data (restarted without persistence, or flushed); submit the job again"
        )
    return f"{head}: unknown to this Redis although submitted {when}, within the {kept_seconds // 86400} days finished jobs are kept: was it submitted to another --queue or database, or deleted?"


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
    if status.damaged:
        lines.append(f"  damaged record: {'; '.join(status.damaged)}")
    return "\n".join(lines)
