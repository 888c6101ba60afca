"""The model-only ceiling: the worker's own onnxruntime session on fixed shapes, at equal token count.

No Parquet, no tokenizer, no padding, no host work between runs: for each length
bucket of the dataset, batches of one fixed shape ``(rows, seq)`` are run until the
bucket's real token count is reached, with ``seq`` the bucket's mean length rounded up
to a multiple of 8 and the rows per batch chosen like the worker's (``--batch-size``
64, 16384-token budget). On GPU the inputs are copied to the device once and the
outputs stay there (I/O binding), so the number is the session's compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.data import BUCKET_EDGES, bucket_of
from benchmarks.measure import Measurement, Stopwatch
from benchmarks.models import Shape
from worker.modeldir.padding import padded_length
from worker.modeldir.session import CUDA
from worker.runner import Runner

FILLER_TOKEN = 2023  # "this": any ordinary token, the cost does not depend on which


@dataclass(frozen=True)
class BucketShape:
    bucket: int
    seq: int
    batch_rows: int
    full_batches: int
    last_rows: int  # rows of the final, smaller batch (0: none)


def bucket_shapes(lengths: np.ndarray, batch_size: int = 64, max_tokens: int = 16384) -> list[BucketShape]:
    """Fixed shapes that cover each bucket's real tokens (to within one row of ``seq`` tokens)."""
    shapes = []
    buckets = bucket_of(lengths)
    for bucket in range(len(BUCKET_EDGES)):
        members = lengths[buckets == bucket]
        if not len(members):
            continue
        seq = padded_length(int(np.ceil(members.mean())), 8)
        rows = max(1, min(batch_size, max_tokens // seq))
        total_rows = max(1, int(round(members.sum() / seq)))  # equal tokens: rows of ``seq`` tokens
        shapes.append(BucketShape(bucket, seq, rows, total_rows // rows, total_rows % rows))
    return shapes


class _Feeder:
    """Runs one fixed-shape batch, with device-bound inputs and outputs on CUDA."""

    def __init__(self, runner: Runner, rows: int, seq: int) -> None:
        self.runner = runner
        self.feeds = {
            "input_ids": np.full((rows, seq), FILLER_TOKEN, dtype=np.int64),
            "attention_mask": np.ones((rows, seq), dtype=np.int64),
            "token_type_ids": np.zeros((rows, seq), dtype=np.int64),
        }
        self.binding = None
        if runner.provider == CUDA:
            import onnxruntime

            self.binding = runner.session.io_binding()
            for name, array in self.feeds.items():
                self.binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
            for name in runner.output_names:
                self.binding.bind_output(name, "cuda", 0)

    def run(self) -> None:
        if self.binding is not None:
            self.runner.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.runner.session.run(self.runner.output_names, self.feeds)


def run_ceiling(runner: Runner, lengths: np.ndarray, shape: Shape, variant: str, precision: str, dataset: str,
                batch_size: int = 64, max_tokens: int = 16384) -> Measurement:
    """Time the session on each bucket's fixed shapes; rows/s is the dataset's rows over the summed time."""
    result = Measurement("ceiling", f"ceiling: ONNX session, fixed shapes ({variant})", dataset, precision)
    clock = Stopwatch("cpu")  # run_with_iobinding + synchronize_outputs already waits for the GPU
    shapes = bucket_shapes(lengths, batch_size, max_tokens)
    result.extra["shapes"] = [s.__dict__ for s in shapes]
    buckets = bucket_of(lengths)
    cuda = runner.provider == CUDA
    _Feeder(runner, 2, 16).run()  # the session's first run initialises its allocator and threads
    for bucket_shape in shapes:
        elapsed = 0.0
        for rows, count in ((bucket_shape.batch_rows, bucket_shape.full_batches), (bucket_shape.last_rows, 1)):
            if rows == 0 or count == 0:
                continue
            feeder = _Feeder(runner, rows, bucket_shape.seq)
            if cuda:
                feeder.run()  # warm-up: on CUDA a shape's first run allocates and picks kernels
            start = clock.now()
            for _ in range(count):
                feeder.run()
            elapsed += clock.now() - start
        real = lengths[buckets == bucket_shape.bucket]
        result.bucket_seconds[bucket_shape.bucket] = elapsed
        result.bucket_tokens[bucket_shape.bucket] = real.sum()
    result.seconds = float(result.bucket_seconds.sum())
    result.rows = len(lengths)
    result.tokens = int(lengths.sum())
    result.useful_flops = shape.flops(lengths)
    return result
