"""The PyTorch baselines, each timed from texts in memory to embeddings in numpy (no Parquet I/O).

* ``users``: the loop people write: transformers' defaults, 64 rows at a time in input
  order, the tokenizer pads each batch to its longest row, mean pooling, ``.cpu().numpy()``.
* ``best``: the best off-the-shelf configuration: SDPA attention (fp16 on GPU, fp32 on
  CPU), ``inference_mode``, rows sorted by length into token-budget batches, lengths
  padded to a multiple of 8 (the worker's own batch planner, which is pure logic).
* ``packed`` (GPU): padding-free BERT, see ``benchmarks/packed.py``; checked against
  transformers on the first rows before it is timed.

Model loading is not timed, for any row (the worker's session start is not timed either).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import Measurement, Stopwatch, cosine_rows
from benchmarks.models import Shape
from worker.batching import plan_batches
from worker.modeldir.manifest import Manifest
from worker.modeldir.padding import pad_rows

WARMUP_ROWS = 16
PACKED_TOKENS = 65536


class BaselineMismatch(RuntimeError):
    """A baseline's embeddings differ from transformers' own: its timing would mean nothing."""


def _torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[precision]


def load_model(checkpoint: Path, device: str, precision: str, attention: str | None) -> Any:
    from transformers import AutoModel

    options: dict[str, Any] = {"dtype": _torch_dtype(precision)}
    if attention:
        options["attn_implementation"] = attention
    return AutoModel.from_pretrained(checkpoint, **options).to(device).eval()


def _pool(output: Any, attention_mask: Any, manifest: Manifest) -> Any:
    import torch

    if manifest.pooling == "cls":
        pooled = output.last_hidden_state[:, 0]
    elif manifest.pooling == "pooler":
        pooled = output.pooler_output
    else:  # mean pooling as the sentence-transformers model cards write it
        token_embeddings = output.last_hidden_state
        mask = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).to(token_embeddings.dtype)
        pooled = torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if manifest.normalize else pooled


def run_users_loop(
    checkpoint: Path, texts: list[str], lengths: np.ndarray, manifest: Manifest, shape: Shape,
    device: str, precision: str, dataset: str, batch_size: int = 64,
) -> Measurement:
    """transformers as users write it: fixed batches in input order, padded to the longest row."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = load_model(checkpoint, device, precision, attention=None)
    result = Measurement("pytorch-users", f"PyTorch as users write it ({precision})", dataset, precision)
    result.extra["attention"] = model.config._attn_implementation

    def embed(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=manifest.max_length, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model(**encoded)
        return _pool(output, encoded["attention_mask"], manifest).float().cpu().numpy()

    embed(texts[:WARMUP_ROWS])
    clock = Stopwatch(device)
    parts = []
    start = clock.now()
    for first in range(0, len(texts), batch_size):
        began = clock.now()
        parts.append(embed(texts[first : first + batch_size]))
        result.attribute(lengths[first : first + batch_size], clock.now() - began)
    result.seconds = clock.now() - start
    _finish(result, parts, lengths, shape)
    return result


def _tokenize_all(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_token_type_ids=True)
    return encoded["input_ids"], encoded["token_type_ids"]


def run_best_config(
    checkpoint: Path, texts: list[str], lengths: np.ndarray, manifest: Manifest, shape: Shape,
    device: str, precision: str, dataset: str, batch_size: int = 64, max_tokens: int = 16384,
) -> Measurement:
    """The best off-the-shelf PyTorch: SDPA, length-sorted token-budget batches padded to a multiple of 8."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = load_model(checkpoint, device, precision, attention="sdpa")
    result = Measurement("pytorch-best", f"PyTorch best: SDPA, sorted batches ({precision})", dataset, precision)
    pad_id = manifest.special_tokens.pad

    def embed(token_ids: list[list[int]], type_ids: list[list[int]]) -> np.ndarray:
        arrays = [torch.from_numpy(array).to(device) for array in pad_rows(token_ids, type_ids, pad_id, multiple_of=8)]
        input_ids, attention_mask, token_type_ids = arrays
        output = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return _pool(output, attention_mask, manifest).float().cpu().numpy()

    clock = Stopwatch(device)
    with torch.inference_mode():
        embed(*_tokenize_all(tokenizer, texts[:WARMUP_ROWS], manifest.max_length))
        embeddings: np.ndarray | None = None
        start = clock.now()
        token_ids, type_ids = _tokenize_all(tokenizer, texts, manifest.max_length)
        result.attribute(lengths, clock.now() - start, by_tokens=True, count_tokens=False)
        for rows in plan_batches([len(ids) for ids in token_ids], batch_size, max_tokens, multiple_of=8):
            began = clock.now()
            vectors = embed([token_ids[i] for i in rows], [type_ids[i] for i in rows])
            if embeddings is None:
                embeddings = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            embeddings[rows] = vectors
            result.attribute(lengths[rows], clock.now() - began)
        result.seconds = clock.now() - start
    _finish(result, [embeddings] if embeddings is not None else [], lengths, shape)
    return result


def run_packed(
    checkpoint: Path, texts: list[str], lengths: np.ndarray, manifest: Manifest, shape: Shape,
    device: str, precision: str, dataset: str, max_tokens: int = PACKED_TOKENS, min_cosine: float = 0.999,
) -> Measurement:
    """Padding-free PyTorch (flash varlen attention on GPU), checked against transformers before it is timed.

    Packed batches waste nothing on padding, so they are as large as suits the GPU: ``max_tokens`` real tokens.
    """
    import torch
    from transformers import AutoTokenizer

    from benchmarks.packed import PackedBert, flash_varlen_attention, pack, rowwise_sdpa_attention

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = load_model(checkpoint, device, precision, attention="sdpa")
    attention = flash_varlen_attention if device == "cuda" else rowwise_sdpa_attention
    packed = PackedBert(model, manifest.pooling or "mean", manifest.normalize, attention)
    result = Measurement("pytorch-packed", f"PyTorch padding-free: flash varlen ({precision})", dataset, precision)

    def embed(token_ids: list[list[int]], type_ids: list[list[int]]) -> np.ndarray:
        return packed.embed(*pack(token_ids, type_ids, device)).cpu().numpy()

    sample = texts[:64]
    sample_ids, sample_types = _tokenize_all(tokenizer, sample, manifest.max_length)
    check = cosine_rows(_transformers_embeddings(model, sample_ids, sample_types, manifest, device), embed(sample_ids, sample_types))
    result.extra["check_vs_transformers_min_cosine"] = float(check.min())
    if check.min() < min_cosine:
        raise BaselineMismatch(
            f"padding-free PyTorch differs from transformers on the first {len(sample)} rows: "
            f"min cosine {check.min():.6f}, expected >= {min_cosine}; its timing is not reported"
        )
    clock = Stopwatch(device)
    embeddings: np.ndarray | None = None
    start = clock.now()
    token_ids, type_ids = _tokenize_all(tokenizer, texts, manifest.max_length)
    result.attribute(lengths, clock.now() - start, by_tokens=True, count_tokens=False)
    for rows in _token_budget_runs(lengths, max_tokens):
        began = clock.now()
        vectors = embed([token_ids[i] for i in rows], [type_ids[i] for i in rows])
        if embeddings is None:
            embeddings = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        embeddings[rows] = vectors
        result.attribute(lengths[rows], clock.now() - began, by_tokens=True)
    result.seconds = clock.now() - start
    _finish(result, [embeddings] if embeddings is not None else [], lengths, shape)
    return result


def _token_budget_runs(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Consecutive rows (input order: packing needs no sorting) holding at most ``max_tokens`` real tokens."""
    runs, start, total = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        if total and total + length > max_tokens:
            runs.append(np.arange(start, index))
            start, total = index, 0
        total += length
    if start < len(lengths):
        runs.append(np.arange(start, len(lengths)))
    return runs


def _transformers_embeddings(model: Any, token_ids: list[list[int]], type_ids: list[list[int]], manifest: Manifest, device: str) -> np.ndarray:
    import torch

    arrays = [torch.from_numpy(a).to(device) for a in pad_rows(token_ids, type_ids, manifest.special_tokens.pad)]
    with torch.inference_mode():
        output = model(input_ids=arrays[0], attention_mask=arrays[1], token_type_ids=arrays[2])
        return _pool(output, arrays[1], manifest).float().cpu().numpy()


def _finish(result: Measurement, parts: list[np.ndarray], lengths: np.ndarray, shape: Shape) -> None:
    result.embeddings = np.concatenate(parts) if len(parts) > 1 else parts[0]
    result.rows = len(lengths)
    result.tokens = int(lengths.sum())
    result.useful_flops = shape.flops(lengths)
