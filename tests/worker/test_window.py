"""The window pipeline without a model: planning, preparing, running (a fake session) and finishing windows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from worker.modeldir.manifest import Manifest, SpecialTokens
from worker.config import RunConfig
from worker.window import plan_windows

CONFIG = RunConfig(model_dir=Path("m"), input="in.parquet", output=Path("out"), text_column="text")
SPECIAL = SpecialTokens(cls=101, sep=102, pad=0, mask=103, unk=100)
EMBED = Manifest(
    task="embed", source="test", max_length=16, special_tokens=SPECIAL, inputs=("input_ids", "attention_mask", "token_type_ids"),
    outputs=("embedding",), opset=17, pooling="mean", embedding_dim=3,
)


def test_padding_multiple_by_device() -> None:
    assert plan_windows(CONFIG, EMBED, 16, on_gpu=False).pad_multiple == 1
    assert plan_windows(CONFIG, EMBED, 16, on_gpu=True).pad_multiple == 8  # tensor cores
    assert plan_windows(replace(CONFIG, pad_multiple=16), EMBED, 16, on_gpu=True).pad_multiple == 16
