"""The embedded default model: the packaged all-MiniLM-L6-v2, exported into ``models/`` on first use.

The worker never imports the exporter: the export itself comes from the caller
(the CLI, ``worker/cli.py``), which is the one place that may reach ``exporter/``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from worker.modeldir.manifest import MANIFEST_NAME

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

Export = Callable[[Path], None]


def models_root() -> Path:
    """Where exported model directories live: ``$BERTBATCH_MODELS`` or ``./models``."""
    return Path(os.environ.get("BERTBATCH_MODELS", "models"))


def ensure_default_model(log: Callable[[str], None], load_export: Callable[[], Export]) -> Path:
    """Return the default model directory, exporting it first if it is not there yet.

    ``load_export`` is called only when the model is missing, before anything is
    written, and returns the function that exports the model into a directory; it
    raises (``ModelDirError``) when this installation cannot export.
    """
    directory = models_root() / DEFAULT_MODEL_NAME
    if (directory / MANIFEST_NAME).is_file():
        return directory
    export = load_export()
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Two first runs at once must not export into the same staging directory.
    with open(directory.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (directory / MANIFEST_NAME).is_file():
            log(f"exporting the default model {DEFAULT_MODEL_NAME} into {directory} (first use)")
            export(directory)
    return directory
