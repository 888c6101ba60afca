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
from worker.batching import PaddedBatch, padded_length, plan_batches
from worker.runner import Runner

# Rough cost of each configuration per padded FLOP, relative to the fp32 ONNX session.
_PYTORCH_FACTOR = 1.2
_VARIANT_FACTOR = {"fp32": 1.0, "optimized": 0.9, "int8": 0.6, "fp16": 0.5}
_MIN_ROWS = 64


@dataclass(frozen=True)
class Plan:
    rows: int  # rows measured per dataset
    generated_rows: int
    estimated_seconds: float  # for all configurations on ``rows`` rows
    flops_per_second: float  # the calibration's measured model speed

    @property
    def cut(self) -> bool:
        return self.rows < self.generated_rows


def padded_flops(shape: Shape, lengths: np.ndarray, sort: bool, batch_size: int = 64, max_tokens: int | None = 16384) -> float:
    """FLOPs of the batches a planner makes, counting every padded position as a token."""
    total = 0.0
    multiple = 8 if sort else 1
    for rows in plan_batches(lengths.tolist(), batch_size, max_tokens if sort else None, sort_by_length=sort, multiple_of=multiple):
        width = padded_length(int(lengths[rows].max()), multiple)
        total += shape.flops(np.full(len(rows), width))
    return total


def calibrate(runner: Runner, shape: Shape, rows: int = 4, seq: int = 128) -> float:
    """The session's FLOP/s on one ``(rows, seq)`` batch (second run of two)."""
    batch = PaddedBatch(
        np.arange(rows), np.full((rows, seq), 2023, np.int64), np.ones((rows, seq), np.int64), np.zeros((rows, seq), np.int64)
    )
    runner.run(batch)
    start = time.perf_counter()
    runner.run(batch)
    return shape.flops(np.full(rows, seq)) / (time.perf_counter() - start)


def estimate_seconds(shape: Shape, datasets: list[np.ndarray], variants: list[str], cuda: bool, flops_per_second: float) -> float:
    total = 0.0
    for lengths in datasets:
        real = shape.flops(lengths)
        sorted_flops = padded_flops(shape, lengths, sort=True)
        naive_flops = padded_flops(shape, lengths, sort=False)
        for variant in variants:  # worker end to end + ceiling
            total += (sorted_flops + real) * _VARIANT_FACTOR.get(variant, 1.0)
        pytorch = naive_flops + sorted_flops  # as users write it + best
        if cuda:
            pytorch += naive_flops * 0.5 + real * 0.5  # fp16 users' loop + padding-free
        total += pytorch * _PYTORCH_FACTOR
    return total / flops_per_second


def plan_rows(shape: Shape, datasets: list[np.ndarray], variants: list[str], cuda: bool, flops_per_second: float, budget_seconds: float | None) -> Plan:
    generated = len(datasets[0])
    full = estimate_seconds(shape, datasets, variants, cuda, flops_per_second)
    if not budget_seconds or full <= budget_seconds:
        return Plan(generated, generated, full, flops_per_second)
    rows = min(generated, max(_MIN_ROWS, int(generated * budget_seconds / full)))
    estimated = estimate_seconds(shape, [lengths[:rows] for lengths in datasets], variants, cuda, flops_per_second)
    return Plan(rows, generated, estimated, flops_per_second)
