"""``bertbatch submit``: check a job the way a worker will, then queue it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from worker.config import RunConfig, config_to_spec
from worker.confinement import check_confined, with_absolute_paths
from worker.checks import check_job
from worker.jobqueue import JobQueue


def submit_job(config: RunConfig, queue_url: str, allow_roots: Sequence[Path]) -> str:
    """Queue ``config`` as a job and return its id; nothing is queued when a check fails.

    Paths are made absolute, confined to ``allow_roots``, and the model directory, options and
    input columns are checked as ``run_job`` checks them.
    """
    config = with_absolute_paths(config)
    check_confined(config, allow_roots)
    check_job(config)
    return JobQueue.connect(queue_url).enqueue(config_to_spec(config))
