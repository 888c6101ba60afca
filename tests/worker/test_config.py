"""The job config's JSON form (a queued job's spec)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import RunConfig, config_from_spec, config_to_spec

CONFIG = RunConfig(model_dir=Path("/m"), input="/d/*.parquet", output=Path("/o"), text_column="t")


def test_a_spec_queued_by_an_older_version_with_a_retired_field_still_loads() -> None:
    # Earlier versions wrote "progress" (a display option, never part of the job) into every spec.
    assert config_from_spec({**config_to_spec(CONFIG), "progress": True}) == CONFIG


def test_a_spec_missing_a_required_field_is_refused() -> None:
    spec = config_to_spec(CONFIG)
    del spec["text_column"]
    with pytest.raises(ValueError, match="text_column"):
        config_from_spec(spec)


def test_the_long_text_options_survive_a_queued_spec() -> None:
    import json

    config = RunConfig(
        model_dir=Path("/m"), input="/d/*.parquet", output=Path("/o"), text_column="t", chunking="rows", chunk_overlap=8,
        prompt="query: ", dimensions=128, embedding_dtype="int8", calibration_rows=50, calibration=Path("/c/e.parquet"),
    )  # fmt: skip
    again = config_from_spec(json.loads(json.dumps(config_to_spec(config))))
    assert again == config and isinstance(again.calibration, Path)
    assert config_from_spec(json.loads(json.dumps(config_to_spec(RunConfig(Path("/m"), "/d", Path("/o"), "t"))))).calibration is None
