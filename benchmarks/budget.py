"""Fitting the benchmark into a time budget by measuring fewer rows, the same rows for every configuration.

The cost of each configuration is estimated in FLOPs from the batches it will run
(padding included: the users' loop pads 64 input-order rows to the longest one),
and turned into seconds with the model's own speed, measured on one small batch.
If the sum exceeds the budget, every configuration runs on the first ``k`` rows of
both datasets (rows are drawn independently, so a prefix has the same length mix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from benchmarks.models import Shape
from worker.batching import PaddedBatch, plan_batches
from worker.modeldir.padding import padded_length
from worker.runner import Runner

# Rough cost of each configuration per padded FLOP, relative to the fp32 ONNX session.
_PYTORCH_FACTOR = 1.2
_VARIANT_FACTOR = {"fp32": 1.0, "optimized": 0.9, "int8": 0.6, "fp16": 0.5, "packed": 0.5}
_MIN_ROWS = 64


@dataclass(frozen=True)
class Plan:
    rows: dict[str, int]  # rows measured, per dataset
    generated_rows: int
    estimated_seconds: float  # for all configurations on the planned rows
    flops_per_second: float  # the calibration's measured model speed

    @property
    def cut(self) -> bool:
        return any(rows < self.generated_rows for rows in self.rows.values())


def padded_flops(shape: Shape, lengths: np.ndarray, sort: bool, batch_size: int = 64, max_tokens: int | None = 16384) -> float:
    """FLOPs of the batches a planner makes, counting every padded position as a token."""
    total = 0.0
    multiple = 8 if sort else 1
    for rows in plan_batches(lengths.tolist(), batch_size, max_tokens if sort else None, sort_by_length=sort, multiple_of=multiple):
        width = padded_length(int(lengths[rows].max()), multiple)
        total += shape.flops(np.full(len(rows), width))
    return total


def calibrate(runner: Runner, shape: Shape, rows: int = 4, seq: int = 128) -> float:
    """The session's FLOP/s on one ``(rows, seq)`` batch."""
    batch = PaddedBatch(
        np.arange(rows), np.full((rows, seq), 2023, np.int64), np.ones((rows, seq), np.int64), np.zeros((rows, seq), np.int64)
    )
    runner.run(batch)
    seconds = []
    for _ in range(3):  # the median: a prediction of the whole run should include the usual interference
        start = time.perf_counter()
        runner.run(batch)
        seconds.append(time.perf_counter() - start)
    return shape.flops(np.full(rows, seq)) / float(np.median(seconds))


def estimate_seconds(
    shape: Shape, lengths: np.ndarray, variants: list[str], cuda: bool, flops_per_second: float, batching: tuple[int, int | None]
) -> float:
    """Seconds for every configuration over one dataset; ``batching`` is the worker's (rows, token budget)."""
    real = shape.flops(lengths)
    sorted_flops = padded_flops(shape, lengths, True, *batching)
    naive_flops = padded_flops(shape, lengths, sort=False)
    total = sum((sorted_flops + real) * _VARIANT_FACTOR.get(variant, 1.0) for variant in variants)  # worker + ceiling
    pytorch = naive_flops + sorted_flops  # as users write it + best
    if cuda:
        pytorch += naive_flops * 0.5 + real * 0.5  # the fp16 users' loop + padding-free
    return (total + pytorch * _PYTORCH_FACTOR) / flops_per_second


def plan_rows(
    shape: Shape, datasets: dict[str, np.ndarray], shares: dict[str, float], variants: list[str], cuda: bool,
    flops_per_second: float, budget_seconds: float | None, batching: tuple[int, int | None] = (64, 16384),
) -> Plan:
    """Rows per dataset so that each dataset's configurations fit its share of the budget."""
    generated = len(next(iter(datasets.values())))
    rows, estimated = {}, 0.0
    for name, lengths in datasets.items():
        full = estimate_seconds(shape, lengths, variants, cuda, flops_per_second, batching)
        allowed = budget_seconds * shares[name] if budget_seconds else None
        count = generated if allowed is None or full <= allowed else min(generated, max(_MIN_ROWS, int(generated * allowed / full)))
        rows[name] = count
        estimated += full if count == generated else estimate_seconds(shape, lengths[:count], variants, cuda, flops_per_second, batching)
    return Plan(rows, generated, estimated, flops_per_second)
