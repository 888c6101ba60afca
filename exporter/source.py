"""Resolve and load a checkpoint: a hub id, a local directory or a sentence-transformers directory.

Loading goes through transformers the way a user's own code would, with remote
code refused and weights loaded safely (safetensors, or ``weights_only`` pickles).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.architectures import ArchitectureSpec, architecture_for
from exporter.errors import SourceError
from exporter.tasks import TASK_SPECS, TaskSpec
from worker.modeldir.manifest import Pooling, Task

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# What a hub download needs; never *.bin pickles when safetensors exist, never ONNX or other frameworks.
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "1_Pooling/*", "2_Normalize/*"]


@dataclass(frozen=True)
class SentenceTransformersSettings:
    """Defaults read from a sentence-transformers directory."""

    pooling: Pooling
    normalize: bool
    max_seq_length: int | None
    # config_sentence_transformers.json's prompts, and Pooling's include_prompt (False: the
    # prompt's tokens are left out of mean pooling; the graph then takes a pooling_mask).
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint found on disk."""

    given: str  # as the user wrote it; recorded in the manifest
    transformer_dir: Path
    sentence_transformers: SentenceTransformersSettings | None


def resolve_source(source: str) -> ResolvedSource:
    """Find the checkpoint on disk, downloading from the hub only when it is not a local path."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source}: not a directory; give a checkpoint directory or a hub model id")
        root = path.resolve()
    else:
        root = _download(source)
    modules_file = root / "modules.json"
    if modules_file.is_file():
        return _resolve_sentence_transformers(source, root, modules_file)
    if not (root / "config.json").is_file():
        raise SourceError(f"{source}: no config.json in {root}; is this a Hugging Face checkpoint directory?")
    return ResolvedSource(given=source, transformer_dir=root, sentence_transformers=None)


def _download(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # the hub client raises many types; all mean "not available"
        raise SourceError(
            f"{model_id}: not a local directory, and not available from the Hugging Face hub or its cache "
            f"({type(error).__name__}: {error}). Offline, pass a local checkpoint directory."
        ) from error


def _resolve_sentence_transformers(source: str, root: Path, modules_file: Path) -> ResolvedSource:
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    transformer_dir: Path | None = None
    pooling: Pooling = "mean"
    normalize = False
    include_prompt = True
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        module_dir = root / module.get("path", "")
        if kind == "Transformer":
            transformer_dir = module_dir
        elif kind == "Pooling":
            pooling = _read_pooling(source, module_dir / "config.json")
            include_prompt = bool(json.loads((module_dir / "config.json").read_text(encoding="utf-8")).get("include_prompt", True))
            if not include_prompt and pooling != "mean":
                raise SourceError(f"{source}: include_prompt false is supported with mean pooling only, this model pools {pooling}")
        elif kind == "Normalize":
            normalize = True
        else:
            raise SourceError(
                f"{source}: sentence-transformers module {module['type']!r} is not supported "
                "(bertbatch exports Transformer, Pooling and Normalize pipelines)"
            )
    if transformer_dir is None:
        raise SourceError(f"{source}: modules.json has no Transformer module")
    max_seq_length = None
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        settings_file = transformer_dir / name
        if settings_file.is_file():
            max_seq_length = json.loads(settings_file.read_text(encoding="utf-8")).get("max_seq_length")
    prompts: dict[str, str] = {}
    default_prompt_name = None
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text(encoding="utf-8"))
        prompts = {str(name): str(text) for name, text in (declared.get("prompts") or {}).items()}
        default_prompt_name = declared.get("default_prompt_name")
    return ResolvedSource(
        given=source,
        transformer_dir=transformer_dir,
        sentence_transformers=SentenceTransformersSettings(
            pooling, normalize, max_seq_length, prompts, default_prompt_name, include_prompt
        ),
    )


def _read_pooling(source: str, config_file: Path) -> Pooling:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("pooling_mode_mean_tokens"):
        chosen: Pooling = "mean"
    elif config.get("pooling_mode_cls_token"):
        chosen = "cls"
    else:
        raise SourceError(f"{source}: pooling in {config_file} is not mean or cls; pass --pooling explicitly")
    others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and not k.endswith(("mean_tokens", "cls_token"))]
    if others or (config.get("pooling_mode_mean_tokens") and config.get("pooling_mode_cls_token")):
        raise SourceError(f"{source}: combined pooling modes in {config_file} are not supported")
    return chosen


def load_config(resolved: ResolvedSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved.transformer_dir, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise SourceError(f"{resolved.given}: cannot read config: {error}") from error


def load_model(resolved: ResolvedSource, task: Task) -> tuple[Any, ArchitectureSpec]:
    """Load the PyTorch model for ``task`` in eval mode, refusing checkpoints with missing head weights."""
    import transformers

    config = load_config(resolved)
    architecture = architecture_for(config.model_type, resolved.given)
    spec = TASK_SPECS[task]
    _refuse_other_classifier(resolved.given, task, getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, spec.model_class)
    try:
        model, loading_info = model_class.from_pretrained(
            resolved.transformer_dir,
            trust_remote_code=False,
            output_loading_info=True,
            # Eager attention exports to the plain MatMul/Softmax pattern that
            # onnxruntime's transformer optimizer knows how to fuse.
            attn_implementation="eager",
        )
    except Exception as error:  # OSError for missing weights, ValueError for unsafe pickles, ...
        raise SourceError(f"{resolved.given}: cannot load weights for task {task!r}: {error}") from error
    missing = list(loading_info.get("missing_keys", []))
    _refuse_missing_head(resolved.given, spec, architecture, missing, _tied_keys(model))
    if spec.model_class == "AutoModel" and architecture.pooler_prefix and any(k.startswith(architecture.pooler_prefix) for k in missing):
        # A base model loaded from a masked-LM checkpoint (roberta-base, xlm-roberta-base) gets a
        # randomly initialised pooler: drop it, so --pooling pooler is refused instead of exporting noise.
        model.pooler = None
    model.eval()
    return model, architecture


def _tied_keys(model: Any) -> set[str]:
    # transformers 5: {tied weight: the weight it shares}; 4.x: a list of tied weights.
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied)


# Both heads are one ``classifier`` Linear(hidden, labels): the weights load either way, so the
# checkpoint's declared architecture is what tells a sequence classifier from a token classifier.
_CLASSIFIER_SUFFIXES = {"classify": "ForSequenceClassification", "token-classify": "ForTokenClassification"}


def _refuse_other_classifier(source: str, task: Task, architectures: list[str]) -> None:
    wanted = _CLASSIFIER_SUFFIXES.get(task)
    others = [suffix for name, suffix in _CLASSIFIER_SUFFIXES.items() if name != task]
    if wanted is None or any(name.endswith(wanted) for name in architectures):
        return
    declared = [name for name in architectures if name.endswith(tuple(others))]
    if declared:
        other_task = next(name for name, suffix in _CLASSIFIER_SUFFIXES.items() if declared[0].endswith(suffix))
        raise SourceError(
            f"{source}: is a {declared[0]} checkpoint, not a *{wanted} one; export it with --task {other_task}"
        )


def _refuse_missing_head(
    source: str, spec: TaskSpec, architecture: ArchitectureSpec, missing: list[str], tied: Collection[str] = ()
) -> None:
    # A head that transformers had to initialise randomly would export fine and
    # predict noise: refuse it instead of producing a plausible-looking model.
    if spec.head_weights is None:
        return
    prefix = spec.head_weights.prefix(architecture)
    tied_weights = set(tied) | {f"{p}predictions.decoder.weight" for p in architecture.masked_lm_head_prefix}
    head_missing = [k for k in missing if k.startswith(prefix) and k not in tied_weights]
    if head_missing:
        raise SourceError(
            f"{source}: is not {spec.head_weights.checkpoint_kind} checkpoint: weights "
            f"{', '.join(sorted(head_missing)[:4])} are missing and would be random"
        )


def load_tokenizer(resolved: ResolvedSource) -> Tokenizer:
    """The fast tokenizer, with padding and truncation switched off (the worker sets them per run).

    A checkpoint without ``tokenizer.json`` is converted from its slow tokenizer's files
    (``exporter.tokenizer``); the export then checks the result against transformers.
    """
    from tokenizers import Tokenizer

    tokenizer_file = resolved.transformer_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        from exporter.tokenizer import convert_tokenizer

        tokenizer = convert_tokenizer(resolved.transformer_dir, resolved.given)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenizer_max_length(resolved: ResolvedSource) -> int | None:
    config_file = resolved.transformer_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text(encoding="utf-8")).get("model_max_length")
    # transformers writes a huge sentinel (1e30) when the length is unknown.
    return int(value) if isinstance(value, (int, float)) and value < 1_000_000 else None
