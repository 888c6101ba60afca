"""What one benchmark row is, and the numbers shared by all rows: peak FLOP/s, cosines, per-bucket attribution."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from benchmarks.data import BUCKET_EDGES, bucket_of

# "host": the worker's job with the model stubbed (benchmarks/worker_e2e.py), no embeddings, no FLOPs.
Kind = Literal["worker", "host", "pytorch-users", "pytorch-best", "pytorch-packed", "ceiling"]
# The H100's dense fp16 tensor-core rate as measured in the issue; used on H100s instead of a quick matmul.
H100_FP16_PEAK = 790e12


@dataclass
class Measurement:
    """One row of the table: a configuration run over one dataset."""

    kind: Kind
    name: str
    dataset: str
    precision: str
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    useful_flops: float = 0.0
    embeddings: np.ndarray | None = field(default=None, repr=False)
    # Per length bucket: seconds and real tokens attributed to it (batch time split evenly over its rows).
    bucket_seconds: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKET_EDGES)))
    bucket_tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKET_EDGES)))
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def attribute(self, lengths: np.ndarray, seconds: float, by_tokens: bool = False, count_tokens: bool = True) -> None:
        """Charge ``seconds`` of one batch to the length buckets of its rows.

        Padded batches split evenly over their rows (each row pays the batch's padded
        length); unpadded work (tokenizing, packed rows) splits by real tokens.
        ``count_tokens=False`` adds time only, for work done once over rows counted elsewhere.
        """
        if not len(lengths):
            return
        buckets = bucket_of(lengths)
        shares = lengths / lengths.sum() if by_tokens else np.full(len(lengths), 1.0 / len(lengths))
        np.add.at(self.bucket_seconds, buckets, seconds * shares)
        if count_tokens:
            np.add.at(self.bucket_tokens, buckets, lengths)


class Stopwatch:
    """Wall-clock timing that waits for the GPU before reading the clock."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def cosine_rows(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``other`` with the same row of ``reference``."""
    a = reference.astype(np.float64)
    b = other.astype(np.float64)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denominator, 1e-30)


def measure_peak_flops(device: str, seconds: float = 2.0) -> tuple[float, str]:
    """Dense matmul FLOP/s in this process, best of ~``seconds`` of runs: fp32 on CPU, fp16 on GPU (790e12 on an H100, from the issue)."""
    import torch

    if device == "cuda":
        size, dtype = 8192, torch.float16
    else:
        size, dtype = 2048, torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    clock = Stopwatch(device)
    (a @ b).sum().item()
    # The fastest of many single products: on a shared machine the average measures the neighbours.
    fastest, began = float("inf"), clock.now()
    while clock.now() - began < seconds:
        start = clock.now()
        torch.matmul(a, b)
        fastest = min(fastest, clock.now() - start)
    measured = 2.0 * size**3 / fastest
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if "H100" in name:
            return H100_FP16_PEAK, f"{name}: 790 TFLOP/s fp16 dense (issue's measurement; this run's {size}^3 fp16 matmul: {measured / 1e12:.0f} TFLOP/s)"
        return measured, f"{name}: {size}^3 fp16 matmul measured in-process"
    return measured, f"CPU, {torch.get_num_threads()} threads: {size}^3 fp32 torch.matmul measured in-process"
