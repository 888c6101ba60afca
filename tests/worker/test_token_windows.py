"""Token-classify windows without a model: a stride splits a long row into several units, whose
results and failures land on their row (tests/worker/modelless.py's tokenizer and a fake session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from modelless import VOCABULARY, manifest, save_tokenizer
from tokenizers import Tokenizer

from worker.batching import PaddedBatch
from worker.config import RunConfig
from worker.errors import UsageError
from worker.modeldir.manifest import Manifest
from worker.modeldir.session import CPU
from worker.runner import Runner
from worker.source import Shard
from worker.tokenize import load_tokenizer
from worker.window import INFERENCE_FAILED, LoadedModel, compute_window, plan_windows, prepare_window

LABELS = {0: "O", 1: "B-ANIMAL", 2: "I-ANIMAL"}
ANIMALS = {VOCABULARY.index(word) for word in ("fox", "dog")}
MAX_LENGTH = 6
STRIDE = 1
SHARD = Shard(file_index=0, shard_index=0, row_groups=(0,), num_rows=0)
TEXTS = ["the quick brown fox jumps over a lazy dog", None, "a dog", "kathmandu fox fox"]


def token_manifest() -> Manifest:
    from dataclasses import replace

    base = manifest("classify", max_length=MAX_LENGTH)
    return replace(base, task="token-classify", outputs=("token_probs",), id2label=LABELS, activation=None)


class AnimalRunner(Runner):
    """B-ANIMAL on fox and dog, O elsewhere; fails on any batch holding ``poison`` (a token id)."""

    def __init__(self, poison: int | None = None) -> None:  # no session
        self.provider = CPU
        self.poison = poison
        self.batches: list[PaddedBatch] = []

    def run(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        if self.poison is not None and (batch.input_ids == self.poison).any():
            raise RuntimeError("kernel failure")
        self.batches.append(batch)
        label = np.where(np.isin(batch.input_ids, list(ANIMALS)), 1, 0)
        probs = np.full((*batch.input_ids.shape, len(LABELS)), 0.05, np.float32)
        np.put_along_axis(probs, label[..., None], 0.9, axis=-1)
        return {"token_probs": probs}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


def compute(tokenizer: Tokenizer, runner: AnimalRunner, stride: int | None) -> pa.Table:
    config = RunConfig(model_dir=Path("m"), input="in", output=Path("out"), text_column="text", stride=stride, batch_size=2)
    model = token_manifest()
    plan = plan_windows(config, model, MAX_LENGTH, on_gpu=False)
    table = pa.RecordBatch.from_pydict({"text": pa.array(TEXTS, pa.string())})
    prepared = prepare_window(plan, tokenizer, SHARD, 0, table, last_of_shard=True)
    return compute_window(plan, LoadedModel(model, runner, VOCABULARY), prepared).table


def test_a_stride_finds_entities_past_the_first_window(tokenizer_path: Path) -> None:
    truncated = compute(load_tokenizer(tokenizer_path, MAX_LENGTH), AnimalRunner(), None).to_pylist()
    strided = compute(load_tokenizer(tokenizer_path, MAX_LENGTH, STRIDE), AnimalRunner(), STRIDE).to_pylist()

    # Four words fit in a window: without a stride the first row ends after its fox, before its dog.
    assert [e["text"] for e in truncated[0]["entities"]] == ["fox"] and truncated[0]["truncated"] is True
    assert [(e["text"], e["start"]) for e in strided[0]["entities"]] == [("fox", 16), ("dog", 38)]
    assert strided[0]["truncated"] is False and strided[0]["num_tokens"] > MAX_LENGTH
    assert strided[1]["entities"] is None and "null text" in strided[1]["error"]
    assert [e["text"] for e in strided[2]["entities"]] == ["dog"]
    # "fox fox": two B- tags in a row are two entities, as the pipeline groups them.
    assert [(e["label"], e["start"]) for e in strided[3]["entities"]] == [("ANIMAL", 10), ("ANIMAL", 14)]


def test_a_failing_window_fails_only_its_row(tokenizer_path: Path) -> None:
    lazy = VOCABULARY.index("lazy")  # only in the first row's last window
    rows = compute(load_tokenizer(tokenizer_path, MAX_LENGTH, STRIDE), AnimalRunner(poison=lazy), STRIDE).to_pylist()
    assert rows[0]["entities"] is None and rows[0]["error"].startswith(INFERENCE_FAILED)
    assert [e["text"] for e in rows[2]["entities"]] == ["dog"] and rows[2]["error"] is None


def test_a_stride_that_leaves_no_room_is_refused(tokenizer_path: Path) -> None:
    with pytest.raises(UsageError, match="--stride must be between 0 and 3"):
        load_tokenizer(tokenizer_path, MAX_LENGTH, 4)  # [CLS] and [SEP] leave 4 of the 6 tokens
