"""Turning model outputs into Arrow result columns, in the window's original row order.

The worker's spec of each task is its decoder here: the result columns it adds
(``schema``) and how a window's batch outputs become those columns. The exporter's
half of a task is ``exporter/tasks.py``; ``tests/test_task_registry.py`` fails when
a task misses either.

Batches arrive length-sorted; each carries the window row indices of its rows,
so results are scattered back to their rows here and order is restored for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from worker.batching import PaddedBatch
from worker.config import Aggregation, RunConfig
from worker.entities import DEFAULT_IGNORE_LABELS, TokenOffsets, TokenVocabulary, TokenWindow, extract_entities
from worker.modeldir.manifest import Manifest, Task

FILL_TYPE = pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("score", pa.float32())])
ENTITY_TYPE = pa.struct(
    [("label", pa.string()), ("score", pa.float32()), ("start", pa.int32()), ("end", pa.int32()), ("text", pa.string())]
)
ERROR_FIELD = pa.field("error", pa.string())
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class DecodeOptions:
    """Run options that change how outputs become columns (part of the job's identity)."""

    threshold: float = DEFAULT_THRESHOLD  # multi-label classify: labels with a probability at least this
    aggregation: Aggregation = "simple"  # token-classify, as transformers' pipeline aggregation_strategy
    ignore_labels: tuple[str, ...] = DEFAULT_IGNORE_LABELS


def decode_options(config: RunConfig) -> DecodeOptions:
    """The run options that shape result columns, defaults filled in."""
    return DecodeOptions(
        threshold=config.threshold if config.threshold is not None else DEFAULT_THRESHOLD,
        aggregation=config.aggregation or "simple",
        ignore_labels=tuple(config.ignore_labels) if config.ignore_labels is not None else DEFAULT_IGNORE_LABELS,
    )


class TaskDecoder:
    """Collects one task's per-row outputs over a window, batch by batch, and builds its result columns."""

    task: ClassVar[Task]
    takes_top_k: ClassVar[bool] = False  # `run --top-k` keeps fewer of the export's top-k

    def __init__(
        self,
        manifest: Manifest,
        num_rows: int,
        top_k: int | None,
        vocabulary: Sequence[str],
        options: DecodeOptions = DecodeOptions(),
        offsets: TokenOffsets | None = None,
    ) -> None:
        self.manifest = manifest
        self.num_rows = num_rows
        self.top_k = top_k
        self.vocabulary = vocabulary
        self.options = options
        self.offsets = offsets  # token-classify: the texts and character offsets entities point into

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        """The result columns the task adds to each row."""
        raise NotImplementedError

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        """The result columns; rows flagged ``null`` get null results."""
        raise NotImplementedError


class EmbeddingDecoder(TaskDecoder):
    task = "embed"

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str], *args: object) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary, *args)  # type: ignore[arg-type]
        self.embedding: np.ndarray | None = None
        self.token_vectors: list[np.ndarray | None] = [None] * num_rows

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        fields = [pa.field("embedding", pa.list_(pa.float32(), manifest.embedding_dim or -1))]
        if manifest.token_embeddings:
            fields += [pa.field("tokens", pa.list_(pa.string())), pa.field("token_embeddings", pa.list_(pa.list_(pa.float32())))]
        return fields

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        vectors = outputs["embedding"]
        if self.embedding is None:
            self.embedding = np.zeros((self.num_rows, vectors.shape[1]), dtype=np.float32)
        self.embedding[batch.rows] = vectors
        if self.manifest.token_embeddings:
            lengths = batch.attention_mask.sum(axis=1)
            for i, row in enumerate(batch.rows):
                self.token_vectors[row] = outputs["token_embeddings"][i, : lengths[i]].astype(np.float32, copy=False)

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        mask = pa.array(null) if null.any() else None
        dim = self.manifest.embedding_dim or (self.embedding.shape[1] if self.embedding is not None else 0)
        values = self.embedding if self.embedding is not None else np.zeros((self.num_rows, dim), np.float32)
        result = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=mask)}
        if self.manifest.token_embeddings:
            result["tokens"] = pa.array(
                [None if null[i] else [self.vocabulary[t] for t in token_ids[i]] for i in range(self.num_rows)],
                pa.list_(pa.string()),
            )
            result["token_embeddings"] = pa.array(
                [None if null[i] or v is None else list(v) for i, v in enumerate(self.token_vectors)],
                pa.list_(pa.list_(pa.float32())),
            )
        return result


class ClassifyDecoder(TaskDecoder):
    task = "classify"

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str], *args: object) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary, *args)  # type: ignore[arg-type]
        self.probs: np.ndarray | None = None
        self.logits: np.ndarray | None = None

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        fields = [
            pa.field("label", pa.string()),
            pa.field("label_id", pa.int64()),
            pa.field("score", pa.float32()),
            pa.field("probs", pa.list_(pa.float32())),
        ]
        if "logits" in manifest.outputs:  # not in exports made before the column existed
            fields.append(pa.field("logits", pa.list_(pa.float32())))
        if manifest.multi_label:
            fields.append(pa.field("labels", pa.list_(pa.string())))
        return fields

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        probs = outputs["probs"]
        if self.probs is None:
            self.probs = np.zeros((self.num_rows, probs.shape[1]), dtype=np.float32)
        self.probs[batch.rows] = probs
        if "logits" in outputs:
            if self.logits is None:
                self.logits = np.zeros((self.num_rows, outputs["logits"].shape[1]), dtype=np.float32)
            self.logits[batch.rows] = outputs["logits"]

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        mask = pa.array(null) if null.any() else None
        probs = self.probs if self.probs is not None else np.zeros((self.num_rows, len(self.manifest.id2label or {})), np.float32)
        label_ids = probs.argmax(axis=1) if probs.shape[1] else np.zeros(self.num_rows, np.int64)
        labels = self.manifest.id2label or {}
        # pa.array of a NumPy array takes only a NumPy mask; FixedSizeListArray only an Arrow one.
        row_mask = null if null.any() else None
        result = {
            "label": pa.array([labels.get(int(i), str(int(i))) for i in label_ids], pa.string(), mask=row_mask),
            "label_id": pa.array(label_ids.astype(np.int64), mask=row_mask),
            "score": pa.array(probs[np.arange(self.num_rows), label_ids].astype(np.float32), mask=row_mask),
            "probs": _float_lists(probs, mask),
        }
        if "logits" in self.manifest.outputs:
            result["logits"] = _float_lists(self.logits if self.logits is not None else np.zeros_like(probs), mask)
        if self.manifest.multi_label:
            chosen = probs >= self.options.threshold
            result["labels"] = pa.array(
                [None if null[i] else [labels.get(int(j), str(int(j))) for j in np.flatnonzero(chosen[i])] for i in range(self.num_rows)],
                pa.list_(pa.string()),
            )
        return result


class TokenClassifyDecoder(TaskDecoder):
    """Per-token probabilities to entities with character spans, as transformers' pipeline (worker/entities.py)."""

    task = "token-classify"

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str], *args: object) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary, *args)  # type: ignore[arg-type]
        self.token_probs: dict[int, np.ndarray] = {}  # by unit (with --stride a row has several)

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        return [pa.field("entities", pa.list_(ENTITY_TYPE))]

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        lengths = batch.attention_mask.sum(axis=1)
        for i, unit in enumerate(batch.rows):
            self.token_probs[int(unit)] = outputs["token_probs"][i, : lengths[i]].astype(np.float32, copy=True)

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        offsets = self.offsets
        assert offsets is not None, "token-classify rows are tokenized with offsets"
        vocabulary = TokenVocabulary(
            id2label=self.manifest.id2label or {},
            tokens=self.vocabulary,
            unk_id=self.manifest.special_tokens.unk,
            word_aware=bool(self.manifest.subword_prefix),
        )
        windows: list[list[TokenWindow]] = [[] for _ in range(self.num_rows)]
        for unit, probabilities in sorted(self.token_probs.items()):  # a row's windows in text order
            windows[offsets.row_of(unit)].append(offsets.window(unit, probabilities))
        found: list[list[dict[str, object]] | None] = []
        for row in range(self.num_rows):
            if null[row]:
                found.append(None)
                continue
            entities = extract_entities(
                offsets.texts[row] or "", windows[row], vocabulary, self.options.aggregation, self.options.ignore_labels
            )
            found.append([vars(entity) for entity in entities])
        return {"entities": pa.array(found, pa.list_(ENTITY_TYPE))}


class FillMaskDecoder(TaskDecoder):
    task = "fill-mask"
    takes_top_k = True

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str], *args: object) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary, *args)  # type: ignore[arg-type]
        self.fills: list[list[list[dict[str, object]]]] = [[] for _ in range(num_rows)]

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        return [pa.field("fills", pa.list_(pa.list_(FILL_TYPE)))]

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        k = self.top_k or outputs["top_ids"].shape[1]
        # Positions come row-major from the graph's NonZero, so fills are in token order.
        for (batch_row, _), scores, ids in zip(outputs["mask_positions"], outputs["top_scores"], outputs["top_ids"]):
            self.fills[batch.rows[batch_row]].append(
                [
                    {"token": self.vocabulary[token_id], "token_id": int(token_id), "score": float(score)}
                    for token_id, score in zip(ids[:k], scores[:k])
                ]
            )

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        fills = [None if null[i] else self.fills[i] for i in range(self.num_rows)]
        return {"fills": pa.array(fills, pa.list_(pa.list_(FILL_TYPE)))}


DECODERS: dict[Task, type[TaskDecoder]] = {
    decoder.task: decoder for decoder in (EmbeddingDecoder, FillMaskDecoder, ClassifyDecoder, TokenClassifyDecoder)
}


def result_schema(manifest: Manifest) -> list[pa.Field]:
    """The result columns a task adds to each row (plus ``error``)."""
    return DECODERS[manifest.task].schema(manifest) + [ERROR_FIELD]


class WindowResults:
    """Collects per-row outputs of one window, batch by batch, with the decoder of the model's task."""

    def __init__(
        self,
        manifest: Manifest,
        num_rows: int,
        top_k: int | None,
        vocabulary: Sequence[str],
        options: DecodeOptions = DecodeOptions(),
        offsets: TokenOffsets | None = None,
    ) -> None:
        self.decoder = DECODERS[manifest.task](manifest, num_rows, top_k, vocabulary, options, offsets)

    @property
    def embedding(self) -> np.ndarray | None:
        """The pooled embeddings by row, for what follows pooling (chunk means, ``--dimensions``); ``None``
        for other tasks, or before the first batch."""
        return self.decoder.embedding if isinstance(self.decoder, EmbeddingDecoder) else None

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        self.decoder.add(batch, outputs)

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]], errors: list[str | None]) -> dict[str, pa.Array]:
        """Arrow result columns, ``error`` last; rows flagged ``null`` get null results."""
        return {**self.decoder.columns(null, token_ids), "error": pa.array(errors, pa.string())}


def _float_lists(values: np.ndarray, mask: pa.Array | None) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1], mask=mask).cast(
        pa.list_(pa.float32())
    )


def vocabulary_of(tokenizer: object, size: int) -> list[str]:
    """Token strings by id, for decoding fills and per-token outputs."""
    id_to_token = getattr(tokenizer, "id_to_token")
    return [id_to_token(i) or "" for i in range(size)]
