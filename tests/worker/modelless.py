"""Stand-ins for an exported model, for testing the worker's middle without an export, torch or onnxruntime.

- a real ``tokenizers`` word-level tokenizer over a small vocabulary, with BERT's template
  (``[CLS] a [SEP] b [SEP]``), so token ids are known by hand;
- manifests of each task;
- ``FakeRunner``: a session whose outputs are functions of each row's own tokens, so a test can
  tell which row a result came from whatever batch it ran in;
- ``fake_model_dir``: a model directory on disk (manifest, tokenizer, a placeholder ``model.onnx``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from worker.batching import PaddedBatch
from worker.config import Device
from worker.modeldir.manifest import Manifest, SpecialTokens, write_manifest
from worker.modeldir.session import CPU
from worker.runner import ModelDir, Runner

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "kathmandu"]
VOCABULARY = SPECIAL_TOKENS + WORDS
TOKEN_ID = {token: index for index, token in enumerate(VOCABULARY)}
PAD, UNK, CLS, SEP, MASK = range(5)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOP_K = 3


def ids(text: str, pair: str | None = None) -> list[int]:
    """The token ids the tokenizer gives ``text`` (and ``pair``), worked out by hand."""
    words = [TOKEN_ID.get(word, UNK) for word in text.split()]
    if pair is None:
        return [CLS, *words, SEP]
    return [CLS, *words, SEP, *[TOKEN_ID.get(word, UNK) for word in pair.split()], SEP]


def save_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing

    tokenizer = Tokenizer(WordLevel(TOKEN_ID, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    tokenizer.save(str(path))
    return path


def manifest(task: str = "embed", *, token_embeddings: bool = False, max_length: int = 16) -> Manifest:
    special = SpecialTokens(cls=CLS, sep=SEP, pad=PAD, mask=MASK, unk=UNK)
    common = dict(source="modelless test", max_length=max_length, special_tokens=special, inputs=INPUTS, opset=17,
                  validation={"passed": True})
    if task == "embed":
        outputs = ("embedding", "token_embeddings") if token_embeddings else ("embedding",)
        return Manifest(task="embed", outputs=outputs, pooling="mean", embedding_dim=3, token_embeddings=token_embeddings, **common)  # type: ignore[arg-type]
    if task == "classify":
        return Manifest(task="classify", outputs=("probs",), id2label=LABELS, **common)  # type: ignore[arg-type]
    return Manifest(task="fill-mask", outputs=("mask_positions", "top_ids", "top_scores"), top_k=TOP_K, **common)  # type: ignore[arg-type]


def fake_model_dir(directory: Path, model: Manifest) -> ModelDir:
    """A model directory that ``open_model_dir`` accepts; its ``model.onnx`` is a placeholder no session can load."""
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(directory, model)
    (directory / model.model_file).write_bytes(b"not an onnx graph: the tests run FakeRunner")
    save_tokenizer(directory / model.tokenizer_file)
    return ModelDir(directory, model)


def embedding_of(row_ids: list[int]) -> list[float]:
    """FakeRunner's pooled embedding of a row: its length, its first word's id, the sum of its ids."""
    return [float(len(row_ids)), float(row_ids[1]), float(sum(row_ids))]


def probs_of(row_ids: list[int]) -> list[float]:
    """FakeRunner's class probabilities of a row: 0.7 on class (length mod 3)."""
    probs = [0.15, 0.15, 0.15]
    probs[len(row_ids) % 3] = 0.7
    return probs


def fills_of(position: int) -> list[tuple[int, float]]:
    """FakeRunner's top-k (token id, score) at a masked position: words chosen by the position."""
    return [(len(SPECIAL_TOKENS) + (position + rank) % len(WORDS), 0.5 / (rank + 1)) for rank in range(TOP_K)]


class FakeRunner(Runner):
    """A session computed in numpy from each row's real tokens (padding never leaks into a result).

    ``fail`` decides, per batch, whether the run raises (as onnxruntime does on an OOM); ``batches``
    records every batch run.
    """

    def __init__(self, model: Manifest, fail: Callable[[PaddedBatch], bool] = lambda batch: False) -> None:  # no session
        self.manifest = model
        self.provider = CPU
        self.output_names = list(model.outputs)
        self.fail = fail
        self.batches: list[PaddedBatch] = []

    def run(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        if self.fail(batch):
            raise RuntimeError(f"out of memory for {len(batch.rows)} rows")
        self.batches.append(batch)
        rows = [list(row[mask == 1]) for row, mask in zip(batch.input_ids, batch.attention_mask)]
        if self.manifest.task == "embed":
            outputs = {"embedding": np.array([embedding_of(row) for row in rows], np.float32)}
            if self.manifest.token_embeddings:
                width = batch.input_ids.shape[1]
                # Per token: (its id, its position); padded positions hold junk the decoder must cut.
                vectors = np.stack([batch.input_ids, np.broadcast_to(np.arange(width), batch.input_ids.shape)], axis=-1)
                outputs["token_embeddings"] = np.where(batch.attention_mask[..., None] == 1, vectors, -1).astype(np.float32)
            return outputs
        if self.manifest.task == "classify":
            return {"probs": np.array([probs_of(row) for row in rows], np.float32)}
        positions = np.argwhere(batch.input_ids == MASK)  # row-major, as the graph's NonZero gives them
        fills = [fills_of(int(position)) for _, position in positions]
        return {
            "mask_positions": positions.astype(np.int64),
            "top_ids": np.array([[token for token, _ in fill] for fill in fills], np.int64).reshape(-1, TOP_K),
            "top_scores": np.array([[score for _, score in fill] for fill in fills], np.float32).reshape(-1, TOP_K),
        }


def fake_runner_factory(model: Manifest, fail: Callable[[PaddedBatch], bool] = lambda batch: False) -> Callable[[ModelDir, Device, int | None], Runner]:
    """A ``make_runner`` for ``run_job`` and the local engine."""
    return lambda model_dir, device, threads: FakeRunner(model, fail)
