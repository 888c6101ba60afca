"""Running padded batches: the model directory opened, its device chosen, its session (``worker/modeldir/session.py``) fed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.batching import PaddedBatch
from worker.config import Device
from worker.errors import DeviceUnavailable, ModelDirError
from worker.modeldir.manifest import MANIFEST_NAME, Manifest, read_manifest
from worker.modeldir.session import CUDA, FATAL_ONLY, create_session, cuda_unavailable_reason, provider_of

# What a PaddedBatch holds; a graph takes all of them or input_ids and attention_mask only.
# pooling_mask: exports whose pooling leaves the prompt out (sentence-transformers' include_prompt=False).
BATCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pooling_mask")


@dataclass(frozen=True)
class ModelDir:
    path: Path
    manifest: Manifest

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def tokenizer_file(self) -> Path:
        return self.path / self.manifest.tokenizer_file

    @property
    def model_files(self) -> list[Path]:
        """The graph and, for a graph past 2 GB, its external data file: what the model's identity covers."""
        data = [] if self.manifest.model_data_file is None else [self.path / self.manifest.model_data_file]
        return [self.model_file, *data]


def open_model_dir(path: Path) -> ModelDir:
    """Read and check a model directory written by ``bertbatch export``."""
    if not (path / MANIFEST_NAME).is_file():
        raise ModelDirError(f"{path}: no {MANIFEST_NAME}; export a model with `bertbatch export` first")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelDirError(f"{path}/{MANIFEST_NAME}: unreadable manifest: {error}") from error
    if not manifest.validated:
        raise ModelDirError(f"{path}: this export did not pass validation against PyTorch; re-export it")
    model_dir = ModelDir(path, manifest)
    for required in (*model_dir.model_files, model_dir.tokenizer_file):
        if not required.is_file():
            raise ModelDirError(f"{path}: {required.name} is missing")
    return model_dir


class Runner:
    """One onnxruntime session, loaded once, run batch after batch.

    Every batch runs through an IOBinding: on CUDA the inputs are copied to the device
    once, the outputs stay in device memory until the run ends, and only the results
    the model returns (pooled embeddings, probabilities, top-k fills: never the hidden
    states) cross back to the host, in one copy per batch. On CPU the same binding
    hands onnxruntime the numpy arrays without a copy.
    """

    def __init__(self, model_dir: ModelDir, device: Device, threads: int | None = None) -> None:
        import onnxruntime

        # onnxruntime logs its provider fallbacks itself; this class reports what it got, once, as an error or a provider.
        onnxruntime.set_default_logger_severity(FATAL_ONLY)
        manifest = model_dir.manifest
        want_cuda = check_device(model_dir, device)
        try:
            self.session = create_session(
                model_dir.model_file,
                "cuda" if want_cuda else "cpu",
                cuda_options=cuda_provider_options(manifest),
                threads=threads,
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelDirError(f"{model_dir.model_file}: onnxruntime cannot load it: {error}") from error
        self.provider = provider_of(self.session)
        if device == "cuda" and self.provider != CUDA:
            raise DeviceUnavailable(
                "--device cuda: onnxruntime could not initialise CUDA (no GPU, driver or CUDA libraries); "
                "use --device cpu or --device auto"
            )
        self.output_names = list(manifest.outputs)
        # Feeds follow the graph: a family without token types (RoBERTa, DistilBERT, ...) exports
        # no token_type_ids input, and feeding one would fail ("Invalid Feed Input Name").
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        unknown = sorted(set(self.input_names) - set(BATCH_INPUTS))
        if unknown:
            raise ModelDirError(
                f"{model_dir.model_file}: the graph takes inputs {unknown} the worker does not make; "
                f"it feeds {', '.join(BATCH_INPUTS)}. Re-export it with `bertbatch export`"
            )
        _check_embedding_width(model_dir, self.session)
        self._ortvalue = onnxruntime.OrtValue
        self._on_cuda = self.provider == CUDA

    def run(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        feeds = {name: getattr(batch, name) for name in self.input_names}
        if feeds.get("pooling_mask", 0) is None:  # no prompt to leave out: pool every token
            feeds["pooling_mask"] = batch.attention_mask
        binding = self.session.io_binding()
        for name, array in feeds.items():
            if self._on_cuda:
                binding.bind_ortvalue_input(name, self._ortvalue.ortvalue_from_numpy(array, "cuda", 0))
            else:
                binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cuda" if self._on_cuda else "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def _check_embedding_width(model_dir: ModelDir, session: object) -> None:
    # A manifest edited by hand (or copied from another export) must fail here, not while decoding.
    expected = model_dir.manifest.embedding_dim
    for output in session.get_outputs():  # type: ignore[attr-defined]
        width = output.shape[-1] if output.name == "embedding" and output.shape else None
        if expected is not None and isinstance(width, int) and width != expected:
            raise ModelDirError(
                f"{model_dir.path}: the manifest says embedding_dim {expected}, the graph's embedding has {width}; "
                "the manifest belongs to another export: re-export the model"
            )


def check_device(model_dir: ModelDir, device: Device) -> bool:
    """Whether the model runs on CUDA; raises ``DeviceUnavailable`` when what is asked for cannot be had
    (``--device cuda`` without CUDA, or a CUDA-only export on a machine or ``--device`` without it)."""
    no_cuda = "--device cpu was asked for" if device == "cpu" else cuda_unavailable_reason()
    if device == "cuda" and no_cuda:
        raise DeviceUnavailable(f"--device cuda: {no_cuda}; or use --device cpu")
    if model_dir.manifest.cuda_only and no_cuda:
        raise DeviceUnavailable(
            f"{model_dir.path}: this export uses packed attention, which onnxruntime runs on CUDA only ({no_cuda}); "
            "run it on a GPU machine, or use an export made without --packed"
        )
    return no_cuda is None


def cuda_provider_options(manifest: Manifest) -> dict[str, str]:
    """CUDA execution provider settings for a model.

    The arena grows only by what each new shape asks for (batch widths are multiples
    of 8, so a run sees at most max_length / 8 widths) instead of doubling, so device
    memory stays bounded as shapes vary. TF32 is off for float32 graphs: they were
    validated in float32, and TF32 matmuls would change their numbers (export --fp16 for speed).
    """
    return {
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "1" if manifest.precision != "fp32" else "0",
    }
