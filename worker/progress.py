"""Progress and the final summary: a rich progress bar on a terminal, JSON lines for machines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from worker.job import JobSummary

LogFormat = Literal["text", "json"]


class ProgressReporter:
    """Receives row counts from the job; draws a bar (text, on a terminal) or emits JSON lines."""

    def __init__(self, log_format: LogFormat, show_bar: bool, json_every_seconds: float = 5.0) -> None:
        self.log_format = log_format
        self.show_bar = show_bar and log_format == "text"
        self.json_every_seconds = json_every_seconds
        self.rows_done = 0
        self.total = 0
        self._started = time.perf_counter()
        self._last_json = float("-inf")  # the first progress line comes at once
        self._bar: Any = None
        self._task: Any = None

    def start(self, provider: str, total_rows: int) -> None:
        self.total = total_rows
        self._started = time.perf_counter()
        if self.log_format == "json":
            emit_json({"event": "start", "provider": provider, "rows_to_do": total_rows})
        else:
            print(f"bertbatch: running on {provider}, {total_rows:,} rows to do", file=sys.stderr)
        if self.show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("rows"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("rows", total=total_rows, rate="-")

    def advance(self, rows: int) -> None:
        self.rows_done += rows
        elapsed = time.perf_counter() - self._started
        rate = self.rows_done / elapsed if elapsed else 0.0
        if self._bar is not None:
            self._bar.update(self._task, advance=rows, rate=f"{rate:,.0f}")
        if self.log_format == "json" and time.perf_counter() - self._last_json >= self.json_every_seconds:
            self._last_json = time.perf_counter()
            emit_json({"event": "progress", "rows_done": self.rows_done, "rows_to_do": self.total, "rows_per_second": round(rate, 1)})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def emit_json(record: dict[str, Any]) -> None:
    print(json.dumps(record), file=sys.stderr, flush=True)


def summary_record(summary: JobSummary) -> dict[str, Any]:
    return {
        "event": "summary",
        "output": str(summary.output),
        "already_complete": summary.already_complete,
        "rows": summary.rows,
        "error_rows": summary.error_rows,
        "truncated_rows": summary.truncated_rows,
        "tokens": summary.tokens,
        "seconds": round(summary.seconds, 3),
        "rows_per_second": round(summary.rows_per_second, 1),
        "tokens_per_second": round(summary.tokens_per_second, 1),
        "provider": summary.provider,
        "shards_written": summary.shards_written,
        "shards_skipped": summary.shards_skipped,
    }


def summary_text(summary: JobSummary) -> str:
    if summary.already_complete:
        return f"{summary.output}: job already complete ({summary.shards_skipped} shards); nothing to do"
    resumed = f", {summary.shards_skipped} shards already done" if summary.shards_skipped else ""
    return (
        f"{summary.rows:,} rows in {summary.seconds:.1f} s ({summary.rows_per_second:,.0f} rows/s, "
        f"{summary.tokens_per_second:,.0f} tokens/s) on {summary.provider}; "
        f"{summary.truncated_rows:,} truncated, {summary.error_rows:,} with errors; "
        f"{summary.shards_written} shards written to {summary.output}{resumed}"
    )


def event_logger(source: str, log_format: LogFormat) -> Callable[..., None]:
    """A ``log(event, **fields)`` for long-running commands: ``source: event k=v ...`` or JSON lines, on stderr."""

    def log(event: str, **fields: object) -> None:
        if log_format == "json":
            emit_json({"event": event, "time": round(time.time(), 3), **fields})
        else:
            details = " ".join(f"{name}={value}" for name, value in fields.items())
            print(f"bertbatch {source}: {event} {details}".rstrip(), file=sys.stderr, flush=True)

    return log
