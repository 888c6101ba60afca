"""Export a checkpoint to a validated ONNX model directory.

The directory is assembled next to its destination and moved into place only
when validation passed; a failed export is kept as ``<out>.failed`` for
inspection, with its report, and is never mistaken for a usable model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.activation import ActivationChoice, ActivationDecision, choose_activation, declared_activation
from exporter.architectures import ArchitectureSpec, architecture_for
from exporter.errors import DeviceRequired, ExportError, OptimizationError, ValidationMismatch
from exporter.onnx_files import has_external_data, lay_out_export
from exporter.optimize import Quantization, encoder_shape, optimize_onnx, variant_precision
from exporter.packing import check_family_packable, check_packable, convert_to_packed_attention
from exporter.source import ResolvedSource, load_config, load_model, load_tokenizer, resolve_source, tokenizer_max_length
from exporter.tasks import INPUT_NAMES, TASK_SPECS, HeadSettings, TaskSpec, dynamic_axes, recorded_settings
from exporter.tokenizer import check_same_ids, declared_special_tokens
from exporter.validation import POOLING_MASK, prompt_pooling_mask
from exporter.validation import (
    SAMPLE_PAIRS,
    SAMPLE_TEXTS,
    Tolerances,
    ValidationDevice,
    ValidationReport,
    build_cases,
    default_tolerances,
    validate_onnx,
)
from worker.atomic import commit_directory
from worker.exit_codes import ExitCode
from worker.modeldir.manifest import (
    MODEL_DATA_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Attention,
    Layers,
    Manifest,
    Pooling,
    Precision,
    SpecialTokens,
    Task,
    read_manifest,
    write_manifest,
)
from worker.modeldir.padding import pad_rows
from worker.modeldir.session import cuda_unavailable_reason

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import nn

DEFAULT_OPSET = 17
# Small files that let other tools (transformers, tokenizers) rebuild the tokenizer too.
_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``bertbatch export`` decides. ``None`` means: take the checkpoint's own setting.

    ``optimize`` fuses attention, layer norms and GELU with onnxruntime's transformer
    optimizer. ``fp16`` (for GPUs) and ``quantize="int8"`` (dynamic, for CPUs) exclude
    each other and start from the fused graph, so they imply ``optimize``.
    ``packed`` rewrites the fused graph in onnxruntime's packing mode (padding removed
    inside the graph, CUDA only); it is validated on CUDA, so it exports on a GPU machine.
    ``tolerances=None`` takes the defaults of the final precision (``default_tolerances``).
    """

    source: str
    task: Task
    out: Path
    pooling: Pooling | None = None
    normalize: bool | None = None
    layers: Layers = HeadSettings.layers
    token_embeddings: bool = False
    top_k: int = HeadSettings.top_k
    max_length: int | None = None
    opset: int = DEFAULT_OPSET
    tolerances: Tolerances | None = None
    overwrite: bool = False
    optimize: bool = False
    fp16: bool = False
    quantize: Quantization | None = None
    packed: bool = False
    # Weights as ONNX external data (model.onnx.data) even below 2 GB; above, always.
    external_data: bool = False
    activation: ActivationChoice = "auto"  # classify: auto follows the checkpoint (exporter/activation.py)

    @property
    def precision(self) -> Precision:
        return variant_precision(self.fp16, self.quantize)

    @property
    def fused(self) -> bool:
        return self.optimize or self.fp16 or self.quantize is not None or self.packed

    @property
    def attention(self) -> Attention:
        return "packed" if self.packed else "padded"

    @property
    def validation_device(self) -> ValidationDevice:
        return validation_device_for(self.attention)

    @property
    def validation_tolerances(self) -> Tolerances:
        return self.tolerances if self.tolerances is not None else default_tolerances(self.precision)


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: Manifest
    report: ValidationReport


class OutputExists(ExportError):
    exit_code = ExitCode.OUTPUT_CONFLICT


@dataclass(frozen=True)
class LoadedHead:
    """A checkpoint loaded for one task, with the head the graph bakes in: where export and revalidate start."""

    spec: TaskSpec
    model: Any
    architecture: ArchitectureSpec
    tokenizer: Tokenizer
    special: SpecialTokens
    settings: HeadSettings
    head: nn.Module


def load_head(
    resolved: ResolvedSource, task: Task, settings_for: Callable[[ResolvedSource, SpecialTokens], HeadSettings]
) -> LoadedHead:
    """Load a checkpoint for ``task`` and build its head with the settings ``settings_for`` chooses."""
    model, architecture = load_model(resolved, task)
    tokenizer = load_tokenizer(resolved)
    special = special_tokens(tokenizer, resolved)
    settings = settings_for(resolved, special)
    spec = TASK_SPECS[task]
    head = spec.build_head(model, architecture, settings)
    return LoadedHead(spec, model, architecture, tokenizer, special, settings, head)


def check_against_pytorch(
    loaded: LoadedHead,
    onnx_path: Path,
    output_names: tuple[str, ...],
    max_length: int,
    special: SpecialTokens,
    tolerances: Tolerances,
    device: ValidationDevice,
    log: Callable[[str], None],
) -> ValidationReport:
    """Run the validation cases through the head and the ONNX graph, log the report and return it."""
    cases = build_cases(loaded.tokenizer, loaded.spec.task, max_length, special.mask, special.pad)
    report = validate_onnx(loaded.head, onnx_path, loaded.spec.task, output_names, cases, tolerances, device)
    for line in report.summary_lines():
        log(line)
    return report


def validation_device_for(attention: Attention) -> ValidationDevice:
    """Where a model is validated unless told otherwise: where it runs (packed attention runs on CUDA only)."""
    return "cuda" if attention == "packed" else "cpu"


def export_model(config: ExportConfig, log: Callable[[str], None] = print) -> ExportResult:
    """Load, export, validate and write the model directory; raise ``ValidationMismatch`` on differences."""
    out = config.out
    precision = config.precision  # refuses fp16 with int8 before any work
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise OutputExists(f"{out}: already exists and is not empty; pass --overwrite to replace it")
    if config.packed:
        check_packable(config.layers, precision)
        check_family_packable(architecture_for(load_config(resolve_source(config.source)).model_type, config.source))
        _require_cuda("--packed: packed attention runs on CUDA only, and an export is validated where it runs; "
                      "export on the GPU machine")
    if config.activation != "auto" and config.task != "classify":
        raise ExportError(f"--activation applies to --task classify, not {config.task}")
    resolved = resolve_source(config.source)
    log(f"loading {config.source} for task {config.task}")
    activation = _classify_activation(config, resolved) if config.task == "classify" else None
    if activation is not None:
        log(f"classify activation: {activation.activation} ({activation.reason})")
    loaded = load_head(resolved, config.task, lambda resolved, special: _head_settings(config, resolved, special, activation))
    model, architecture, tokenizer = loaded.model, loaded.architecture, loaded.tokenizer
    special, settings, spec = loaded.special, loaded.settings, loaded.spec
    checked = check_same_ids(tokenizer, resolved.transformer_dir, config.source, SAMPLE_TEXTS, SAMPLE_PAIRS)
    log(f"tokenizer.json gives the checkpoint's own tokenizer's ids on {checked} validation texts and pairs")
    max_length = _max_length(config, resolved, model.config, architecture)
    input_names = architecture.input_names(model.config)
    st = resolved.sentence_transformers
    if config.task == "embed" and st is not None and not st.include_prompt and settings.pooling == "mean":
        input_names = (*input_names, POOLING_MASK)  # the worker leaves the prompt's tokens out of it
    output_names = spec.output_names(settings)

    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log(f"exporting to ONNX (opset {config.opset}, dynamic batch and sequence axes)")
    trace_to_onnx(
        loaded.head, settings, spec.task, staging / MODEL_FILE, output_names, config.opset, special.pad,
        input_names=input_names, example=example_rows(tokenizer, settings.mask_token_id if spec.masked_inputs else None),
    )
    if lay_out_export(staging / MODEL_FILE, config.external_data):
        log(f"weights written as ONNX external data ({MODEL_DATA_FILE})")
    tokenizer.save(str(staging / TOKENIZER_FILE))
    for name in _TOKENIZER_COMPANIONS:
        if (resolved.transformer_dir / name).is_file():
            shutil.copyfile(resolved.transformer_dir / name, staging / name)
    optimization: dict[str, Any] = {}
    if config.fused:
        try:
            shape = replace(
                encoder_shape(model.config, spec.encoder_layers(settings)),
                model_type=architecture.model_type,
                unfused_attention=architecture.not_fusable,
            )
            optimization = optimize_onnx(staging / MODEL_FILE, shape, config.fp16, config.quantize, log=log)
            if config.packed:
                log("converting attention to packing mode (RemovePadding, PackedAttention, RestorePadding; CUDA only)")
                optimization["packing"] = convert_to_packed_attention(staging / MODEL_FILE, shape.num_layers)
        except OptimizationError as error:
            failed = _keep_failed(staging, out)
            raise OptimizationError(f"{out}: {error}; the graph as far as it got is kept in {failed}") from error

    tolerances = config.validation_tolerances
    log(f"validating against PyTorch ({precision}: {tolerances.describe()})")
    report = check_against_pytorch(
        loaded, staging / MODEL_FILE, output_names, max_length, special, tolerances, config.validation_device, log
    )
    manifest = Manifest(
        task=config.task,
        source=_recorded_source(config.source),
        max_length=max_length,
        special_tokens=special,
        inputs=input_names,
        outputs=output_names,
        opset=config.opset,
        precision=precision,
        optimized=config.fused,
        optimization=optimization,
        validation=report.to_dict(),
        attention=config.attention,
        prompts=dict(st.prompts) if st is not None and config.task == "embed" else {},
        default_prompt_name=st.default_prompt_name if st is not None and config.task == "embed" else None,
        include_prompt=POOLING_MASK not in input_names,
        subword_prefix=_subword_prefix(tokenizer) if config.task == "token-classify" else None,
        **spec.manifest_fields(settings, model.config),
        model_data_file=MODEL_DATA_FILE if has_external_data(staging / MODEL_FILE) else None,
    )
    write_manifest(staging, manifest)
    if not report.passed:
        failed = _keep_failed(staging, out)
        raise ValidationMismatch(
            f"{out}: the ONNX outputs differ from PyTorch ({report.problems[0]}"
            f"{f' and {len(report.problems) - 1} more' if len(report.problems) > 1 else ''}); "
            f"the export is kept for inspection in {failed}. Tolerances loosen only with --atol/--rtol."
        )
    if out.exists():
        shutil.rmtree(out)
    commit_directory(staging, out)
    log(f"wrote {out}")
    return ExportResult(out, manifest, report)


def _require_cuda(why: str) -> None:
    reason = cuda_unavailable_reason()
    if reason:
        raise DeviceRequired(f"{why} ({reason})")


def _keep_failed(staging: Path, out: Path) -> Path:
    """Move a rejected export aside as ``<out>.failed``, where it is never mistaken for a model."""
    failed = out.parent / f"{out.name}.failed"
    shutil.rmtree(failed, ignore_errors=True)
    staging.rename(failed)
    return failed


def trace_to_onnx(
    head: nn.Module,
    settings: HeadSettings,
    task: Task,
    path: Path,
    output_names: tuple[str, ...],
    opset: int,
    pad_id: int,
    *,
    input_names: tuple[str, ...] = INPUT_NAMES,
    example: tuple[list[list[int]], list[list[int]]] | None = None,
) -> None:
    """Export with the TorchScript exporter, whose graphs onnxruntime's fusions recognise.

    The example batch has two rows of different lengths (a real padding mask), so
    neither an all-ones mask nor a size-1 dimension can be frozen into the graph.
    ``example`` is its (token ids, type ids), from the model's own tokenizer
    (``example_rows``); the default holds bert-base-uncased ids. The graph takes
    ``input_names``: the inputs the model reads.
    """
    import torch

    if example is None:
        mask_id = settings.mask_token_id if TASK_SPECS[task].masked_inputs else None
        first = [101, 2023, 2003, mask_id or 1037, 3231, 1997, 1996, mask_id or 4654, 102]
        second = [101, mask_id or 2117, 2028, 2003, 102]
        example = ([first, second], [[0] * len(first), [0] * 3 + [1] * 2])
    arrays = dict(zip(INPUT_NAMES, pad_rows(example[0], example[1], pad_id)))
    arrays[POOLING_MASK] = prompt_pooling_mask(arrays["attention_mask"])
    # By name: a family without token types has no third positional input for the pooling mask.
    positional = tuple(torch.from_numpy(arrays[name]) for name in input_names if name != POOLING_MASK)
    inputs: tuple[Any, ...] = positional + (({POOLING_MASK: torch.from_numpy(arrays[POOLING_MASK])},) if POOLING_MASK in input_names else ())
    head.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(
                head,
                inputs,
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes(TASK_SPECS[task], settings, input_names),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as error:  # the exporter raises many internal types
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    finally:
        head.eval()  # the exporter restores the previous training flags recursively


def example_rows(tokenizer: Tokenizer, mask_id: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """Two rows for tracing, in the model's own vocabulary: a long single segment (two masks for
    fill-mask) and a shorter sentence pair, so the rows differ in length and in token types."""
    first = tokenizer.encode("This is a test of the export, with a few more words.")
    second = tokenizer.encode("A pair", "of texts")
    rows = [list(first.ids), list(second.ids)]
    if mask_id is not None:
        rows[0][1] = rows[0][len(rows[0]) // 2] = rows[1][1] = mask_id
    return rows, [list(first.type_ids), list(second.type_ids)]


def special_tokens(tokenizer: Tokenizer, resolved: ResolvedSource) -> SpecialTokens:
    names = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
    # transformers 5 writes the special tokens into tokenizer_config.json only; older
    # checkpoints also have special_tokens_map.json, which wins.
    for config_file in (resolved.transformer_dir / "tokenizer_config.json", resolved.transformer_dir / "special_tokens_map.json"):
        if not config_file.is_file():
            continue
        declared = json.loads(config_file.read_text(encoding="utf-8"))
        for key in names:
            value = declared.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    names.update(declared_special_tokens(resolved.transformer_dir, resolved.given))
    ids = {key: tokenizer.token_to_id(token) for key, token in names.items()}
    cls_id, sep_id, pad_id = ids["cls"], ids["sep"], ids["pad"]
    if cls_id is None or sep_id is None or pad_id is None:
        missing = [names[key] for key in ("cls", "sep", "pad") if ids[key] is None]
        raise ExportError(f"{resolved.given}: tokenizer has no {', '.join(missing)} token")
    return SpecialTokens(cls=cls_id, sep=sep_id, pad=pad_id, mask=ids["mask"], unk=ids["unk"])


def _classify_activation(config: ExportConfig, resolved: ResolvedSource) -> ActivationDecision:
    model_config = load_config(resolved)
    folders = [resolved.transformer_dir]
    if (resolved.transformer_dir.parent / "modules.json").is_file():  # a Transformer module in a subfolder
        folders.append(resolved.transformer_dir.parent)
    return choose_activation(
        int(model_config.num_labels),
        getattr(model_config, "problem_type", None),
        declared_activation(folders),
        config.activation,
        source=config.source,
    )


def _subword_prefix(tokenizer: Tokenizer) -> str | None:
    # What transformers' token-classification pipeline reads to tell word starts from word pieces.
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
    return str(prefix) if prefix else None


def _head_settings(
    config: ExportConfig, resolved: ResolvedSource, special: SpecialTokens, activation: ActivationDecision | None = None
) -> HeadSettings:
    st = resolved.sentence_transformers
    return HeadSettings(
        pooling=config.pooling or (st.pooling if st else HeadSettings.pooling),
        normalize=config.normalize if config.normalize is not None else (st.normalize if st else HeadSettings.normalize),
        layers=config.layers,
        token_embeddings=config.token_embeddings,
        top_k=config.top_k,
        mask_token_id=special.mask,
        activation=activation.activation if activation is not None else HeadSettings.activation,
    )


def _max_length(config: ExportConfig, resolved: ResolvedSource, model_config: Any, architecture: ArchitectureSpec) -> int:
    # RoBERTa-style models number positions from padding_idx + 1: 514 embeddings hold 512 tokens.
    positions = architecture.max_length(model_config)
    st = resolved.sentence_transformers
    declared = (st.max_seq_length if st else None) or tokenizer_max_length(resolved) or positions
    if config.max_length is not None and config.max_length > positions:
        raise ExportError(
            f"--max-length {config.max_length} exceeds the {positions} tokens the model's position embeddings hold "
            f"({architecture.model_type}, max_position_embeddings {model_config.max_position_embeddings})"
        )
    return min(config.max_length or declared, positions)


def _recorded_source(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def revalidate(
    directory: Path,
    tolerances: Tolerances | None = None,
    log: Callable[[str], None] = print,
    overrides: dict[str, float] | None = None,
    device: ValidationDevice | None = None,
) -> ValidationReport:
    """Re-run validation of an exported directory against its source checkpoint (``bertbatch validate``).

    Tolerances default to the ones recorded at export; ``overrides`` replaces some of them.
    ``device`` is where onnxruntime runs: CPU by default, CUDA for a packed model (its only choice).
    """
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"{directory}: not a bertbatch model directory: {error}") from error
    if manifest.cuda_only and device == "cpu":
        raise DeviceRequired(f"{directory}: a packed-attention model runs on CUDA only; validate it with --device cuda")
    recorded = manifest.validation.get("tolerances")
    chosen = replace(
        tolerances or (Tolerances(**recorded) if recorded else default_tolerances(manifest.precision)), **(overrides or {})
    )
    loaded = load_head(resolve_source(manifest.source), manifest.task, lambda resolved, special: recorded_settings(manifest))
    report = check_against_pytorch(
        loaded,
        directory / manifest.model_file,
        manifest.outputs,
        manifest.max_length,
        manifest.special_tokens,
        chosen,
        device or validation_device_for(manifest.attention),
        log,
    )
    if not report.passed:
        raise ValidationMismatch(f"{directory}: the ONNX outputs differ from {manifest.source}: {report.problems[0]}")
    return report


def with_tolerances(
    config: ExportConfig,
    atol: float | None,
    rtol: float | None,
    min_cosine: float | None = None,
    min_mean_cosine: float | None = None,
) -> ExportConfig:
    """Override the tolerances given on the command line, starting from the precision's defaults."""
    overrides = {"atol": atol, "rtol": rtol, "min_cosine": min_cosine, "min_mean_cosine": min_mean_cosine}
    chosen = {name: value for name, value in overrides.items() if value is not None}
    return replace(config, tolerances=replace(config.validation_tolerances, **chosen))
