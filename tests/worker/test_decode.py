"""The decoders, without a model: outputs of length-sorted batches come back as columns in row order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from worker.batching import PaddedBatch
from worker.decode import DECODERS, ENTITY_TYPE, DecodeOptions, WindowResults, result_schema
from worker.entities import TokenOffsets
from worker.modeldir.manifest import Manifest, SpecialTokens, Task
from worker.modeldir.padding import pad_rows

VOCABULARY = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "blue", "sky"]
# Rows 0..3 of a window; row 2 is null (it failed or had no text).
TOKENS = [[1, 4, 2], [1, 5, 6, 7, 2], [1, 2], [1, 3, 2]]
NULL = np.array([False, False, True, False])


def a_manifest(task: Task, **fields: object) -> Manifest:
    outputs = {"embed": ("embedding",), "classify": ("probs",), "fill-mask": ("mask_positions", "top_scores", "top_ids"),
               "token-classify": ("token_probs",)}
    fields = {"outputs": outputs[task], **fields}
    return Manifest(
        task=task, source="test", max_length=16, special_tokens=SpecialTokens(cls=1, sep=2, pad=0, mask=3, unk=None),
        inputs=("input_ids", "attention_mask", "token_type_ids"), opset=17, **fields,  # type: ignore[arg-type]
    )


def batch_of(rows: list[int]) -> PaddedBatch:
    return PaddedBatch(np.array(rows), *pad_rows([TOKENS[i] for i in rows], None, pad_id=0))


def decode(
    manifest: Manifest, batches: list[tuple[list[int], dict[str, np.ndarray]]], top_k: int | None = None,
    options: DecodeOptions = DecodeOptions(), offsets: TokenOffsets | None = None,
) -> pa.Table:
    results = WindowResults(manifest, len(TOKENS), top_k, VOCABULARY, options, offsets)
    for rows, outputs in batches:
        results.add(batch_of(rows), outputs)
    errors: list[str | None] = [None, None, "empty text", None]
    table = pa.table(results.columns(NULL, TOKENS, errors))
    assert table.schema.names == [field.name for field in result_schema(manifest)]
    return table


def test_embeddings_return_to_their_rows_with_their_tokens() -> None:
    manifest = a_manifest("embed", embedding_dim=2, token_embeddings=True, pooling="mean")
    long_rows = [1, 0]  # the batches come length-sorted, not in row order
    token_vectors = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    table = decode(manifest, [
        (long_rows, {"embedding": np.array([[1.0, 1.5], [0.0, 0.5]], np.float32), "token_embeddings": token_vectors}),
        ([3], {"embedding": np.array([[3.0, 3.5]], np.float32), "token_embeddings": np.ones((1, 3, 2), np.float32)}),
    ])
    assert table.column("embedding").to_pylist() == [[0.0, 0.5], [1.0, 1.5], None, [3.0, 3.5]]
    assert table.column("tokens").to_pylist() == [["[CLS]", "red", "[SEP]"], ["[CLS]", "green", "blue", "sky", "[SEP]"], None,
                                                  ["[CLS]", "[MASK]", "[SEP]"]]
    per_token = table.column("token_embeddings").to_pylist()
    assert per_token[0] == token_vectors[1, :3].tolist()  # only the real tokens, padding cut off
    assert per_token[1] == token_vectors[0].tolist() and per_token[2] is None and len(per_token[3]) == 3
    assert table.column("error").to_pylist() == [None, None, "empty text", None]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 2)


def test_classify_picks_the_top_label_of_each_row() -> None:
    manifest = a_manifest("classify", id2label={0: "NEGATIVE", 1: "POSITIVE"})
    table = decode(manifest, [
        ([1, 0], {"probs": np.array([[0.8, 0.2], [0.3, 0.7]], np.float32)}),
        ([3], {"probs": np.array([[0.4, 0.6]], np.float32)}),
    ])
    assert table.column("label").to_pylist() == ["POSITIVE", "NEGATIVE", None, "POSITIVE"]
    assert table.column("label_id").to_pylist() == [1, 0, None, 1]
    np.testing.assert_allclose(np.array(table.column("score").to_pylist()[:2]), [0.7, 0.8], rtol=1e-6)
    assert table.column("probs").to_pylist()[2] is None
    np.testing.assert_allclose(table.column("probs").to_pylist()[3], [0.4, 0.6], rtol=1e-6)


def test_fill_mask_groups_fills_by_row_in_token_order_and_cuts_to_top_k() -> None:
    manifest = a_manifest("fill-mask", top_k=3)
    # Batch rows: 0 -> window row 3 (one [MASK]), 1 -> window row 0 (no mask), so one fill list.
    outputs = {
        "mask_positions": np.array([[0, 1]]),
        "top_scores": np.array([[0.5, 0.3, 0.1]], np.float32),
        "top_ids": np.array([[7, 4, 5]]),
    }
    table = decode(manifest, [([3, 0], outputs), ([1], {name: value[:0] for name, value in outputs.items()})], top_k=2)
    fills = table.column("fills").to_pylist()
    assert fills[0] == [] and fills[1] == [] and fills[2] is None
    assert [[(fill["token"], fill["token_id"]) for fill in mask] for mask in fills[3]] == [[("sky", 7), ("red", 4)]]
    assert fills[3][0][0]["score"] == pytest.approx(0.5)


def test_multi_label_lists_the_labels_at_or_above_the_threshold_and_keeps_the_logits() -> None:
    manifest = a_manifest("classify", id2label={0: "toxic", 1: "insult", 2: "spam"}, activation="sigmoid",
                          outputs=("probs", "logits"))
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.3, 0.45]], np.float32)
    logits = np.log(probs / (1 - probs))
    batches = [([0, 1], {"probs": probs, "logits": logits}), ([3], {"probs": probs[:1], "logits": logits[:1]})]
    table = decode(manifest, batches, options=DecodeOptions(threshold=0.3))
    assert table.column_names[-3:] == ["logits", "labels", "error"]
    assert table.column("labels").to_pylist() == [["toxic", "insult"], ["insult", "spam"], None, ["toxic", "insult"]]
    np.testing.assert_allclose(table.column("logits").to_pylist()[1], logits[1], rtol=1e-6)
    assert table.column("label").to_pylist()[1] == "spam"
    default = decode(manifest, batches)  # 0.5
    assert default.column("labels").to_pylist()[1] == []


def test_token_classify_entities_point_into_their_rows_text() -> None:
    # Row 0 "red": one token; row 1 "green blue sky": green is B-COLOR, blue I-COLOR, sky O.
    texts = ["red", "green blue sky", None, "[MASK]"]
    offsets = [[(0, 0), (0, 3), (0, 0)], [(0, 0), (0, 5), (6, 10), (11, 14), (0, 0)], [(0, 0), (0, 0)], [(0, 0), (0, 6), (0, 0)]]
    special = [[1, 0, 1], [1, 0, 0, 0, 1], [1, 1], [1, 0, 1]]
    manifest = a_manifest("token-classify", id2label={0: "O", 1: "B-COLOR", 2: "I-COLOR"}, subword_prefix="##")

    def probs(labels: list[int]) -> np.ndarray:
        return np.eye(3, dtype=np.float32)[labels] * 0.8 + 0.2 / 3

    padded = np.zeros((2, 5, 3), np.float32)
    padded[0] = probs([0, 1, 2, 0, 0])
    padded[1, :3] = probs([0, 1, 0])
    table = decode(manifest, [([1, 0], {"token_probs": padded}), ([3], {"token_probs": probs([0, 0, 0])[None]})],
                   offsets=TokenOffsets(texts, TOKENS, offsets, special))
    entities = table.column("entities").to_pylist()
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in entities[1]] == [("COLOR", 0, 10, "green blue")]
    assert [(e["label"], e["text"]) for e in entities[0]] == [("COLOR", "red")]
    assert entities[2] is None and entities[3] == []
    assert entities[1][0]["score"] == pytest.approx(0.8 + 0.2 / 3)
    assert table.schema.field("entities").type == pa.list_(ENTITY_TYPE)


TESTED_DECODERS = ("embed", "classify", "fill-mask", "token-classify")


def test_every_decoder_has_a_test_here() -> None:
    assert set(DECODERS) == set(TESTED_DECODERS), f"decoders without a test here: {set(DECODERS) - set(TESTED_DECODERS)}"
