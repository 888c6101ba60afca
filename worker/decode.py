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
from typing import ClassVar

import numpy as np
import pyarrow as pa

from worker.batching import PaddedBatch
from worker.modeldir.manifest import Manifest, Task

FILL_TYPE = pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("score", pa.float32())])
ERROR_FIELD = pa.field("error", pa.string())


class TaskDecoder:
    """Collects one task's per-row outputs over a window, batch by batch, and builds its result columns."""

    task: ClassVar[Task]
    takes_top_k: ClassVar[bool] = False  # `run --top-k` keeps fewer of the export's top-k

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str]) -> None:
        self.manifest = manifest
        self.num_rows = num_rows
        self.top_k = top_k
        self.vocabulary = vocabulary

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

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str]) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary)
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

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str]) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary)
        self.probs: np.ndarray | None = None

    @staticmethod
    def schema(manifest: Manifest) -> list[pa.Field]:
        return [
            pa.field("label", pa.string()),
            pa.field("label_id", pa.int64()),
            pa.field("score", pa.float32()),
            pa.field("probs", pa.list_(pa.float32())),
        ]

    def add(self, batch: PaddedBatch, outputs: dict[str, np.ndarray]) -> None:
        probs = outputs["probs"]
        if self.probs is None:
            self.probs = np.zeros((self.num_rows, probs.shape[1]), dtype=np.float32)
        self.probs[batch.rows] = probs

    def columns(self, null: np.ndarray, token_ids: Sequence[Sequence[int]]) -> dict[str, pa.Array]:
        mask = pa.array(null) if null.any() else None
        probs = self.probs if self.probs is not None else np.zeros((self.num_rows, len(self.manifest.id2label or {})), np.float32)
        label_ids = probs.argmax(axis=1) if probs.shape[1] else np.zeros(self.num_rows, np.int64)
        labels = self.manifest.id2label or {}
        # pa.array of a NumPy array takes only a NumPy mask; FixedSizeListArray only an Arrow one.
        row_mask = null if null.any() else None
        return {
            "label": pa.array([labels.get(int(i), str(int(i))) for i in label_ids], pa.string(), mask=row_mask),
            "label_id": pa.array(label_ids.astype(np.int64), mask=row_mask),
            "score": pa.array(probs[np.arange(self.num_rows), label_ids].astype(np.float32), mask=row_mask),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1], mask=mask).cast(
                pa.list_(pa.float32())
            ),
        }


class FillMaskDecoder(TaskDecoder):
    task = "fill-mask"
    takes_top_k = True

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str]) -> None:
        super().__init__(manifest, num_rows, top_k, vocabulary)
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


DECODERS: dict[Task, type[TaskDecoder]] = {decoder.task: decoder for decoder in (EmbeddingDecoder, FillMaskDecoder, ClassifyDecoder)}


def result_schema(manifest: Manifest) -> list[pa.Field]:
    """The result columns a task adds to each row (plus ``error``)."""
    return DECODERS[manifest.task].schema(manifest) + [ERROR_FIELD]


class WindowResults:
    """Collects per-row outputs of one window, batch by batch, with the decoder of the model's task."""

    def __init__(self, manifest: Manifest, num_rows: int, top_k: int | None, vocabulary: Sequence[str]) -> None:
        self.decoder = DECODERS[manifest.task](manifest, num_rows, top_k, vocabulary)

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


def vocabulary_of(tokenizer: object, size: int) -> list[str]:
    """Token strings by id, for decoding fills and per-token outputs."""
    id_to_token = getattr(tokenizer, "id_to_token")
    return [id_to_token(i) or "" for i in range(size)]
