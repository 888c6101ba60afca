"""The local engine (``--engine local``): windows computed by threads of this process.

Three stages overlap: reading and tokenizing (a thread), running the model (a thread), and
building output tables (the consumer: the thread that writes the shards). onnxruntime,
tokenizers and pyarrow release the GIL in their heavy work, so threads keep the device busy.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager

from worker.checks import CheckedJob
from worker.config import Device, RunConfig
from worker.decode import vocabulary_of
from worker.pipeline import in_background
from worker.modeldir.session import CUDA
from worker.runner import ModelDir, Runner
from worker.source import InputFile, Shard
from worker.tokenize import load_tokenizer
from worker.window import (
    ComputedWindow,
    InferredWindow,
    LoadedModel,
    PreparedWindow,
    WindowPlan,
    finish_window,
    plan_windows,
    prepare_shard,
    run_window,
)

RunnerFactory = Callable[[ModelDir, Device, int | None], Runner]


@contextmanager
def compute_locally(
    config: RunConfig, job: CheckedJob, shards: list[Shard], make_runner: RunnerFactory = Runner
) -> Iterator[tuple[str, Iterator[ComputedWindow]]]:
    """Yield ``(provider, computed windows of shards, in order)``; leaving stops and joins the threads.

    ``make_runner`` builds the onnxruntime session (``bertbatch serve`` passes a cache).
    """
    runner = make_runner(job.model_dir, config.device, config.threads)
    plan = plan_windows(config, job.model_dir.manifest, job.max_length, runner.provider == CUDA, job.text, job.embedding)
    tokenizer = load_tokenizer(job.model_dir.tokenizer_file, plan.tokenizer_max_length, plan.stride or 0)
    model = LoadedModel(job.model_dir.manifest, runner, vocabulary_of(tokenizer, tokenizer.get_vocab_size()))
    # The read stage is owned by the run stage only, so closing ``inferred`` stops both threads.
    prepared = in_background(_prepare(plan, tokenizer, job.files, shards), name="bertbatch-read")
    inferred = in_background(_run(plan, model, prepared), name="bertbatch-run")
    del prepared
    try:
        yield runner.provider, (finish_window(plan, window) for window in inferred)
    finally:
        inferred.close()  # stop and join the stage threads, also when leaving on an error or an interrupt


def _prepare(plan: WindowPlan, tokenizer: object, files: list[InputFile], shards: list[Shard]) -> Iterator[PreparedWindow]:
    for shard in shards:
        yield from prepare_shard(plan, tokenizer, files[shard.file_index], shard)


def _run(plan: WindowPlan, model: LoadedModel, windows: Generator[PreparedWindow, None, None]) -> Iterator[InferredWindow]:
    try:
        for window in windows:
            yield run_window(plan, model, window)
    finally:
        windows.close()  # also when this stage fails: stop and join the read stage's thread
