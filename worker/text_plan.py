"""How a job's texts become model inputs: the prompt, then truncation or chunking.

Decided once per job (``plan_text``) and applied window by window (``tokenize_units``).
The units a window hands to batching are its rows (``--chunking off``) or its rows'
chunks (``mean``, ``rows``); either way every unit fits in ``max_length`` tokens, so
token-budget batching bounds every model call however long a text is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from worker.modeldir.manifest import Manifest
from worker.chunking import ChunkedWindow, Template, chunk_length, chunk_window
from worker.config import Chunking, RunConfig
from worker.errors import UsageError
from worker.tokenize import TokenizedRows, tokenize_window

POOLING_MASK = "pooling_mask"  # the graph input of exports whose pooling leaves the prompt out


@dataclass(frozen=True)
class TextPlan:
    """What every window of a job does to its texts before batching."""

    max_length: int
    chunking: Chunking = "off"
    chunk_overlap: int = 32
    prompt: str | None = None
    prompt_ids: tuple[int, ...] = ()  # the prompt's tokens, tokenized alone, without special tokens
    template: Template = Template((), ())
    # Leading positions of every unit left out of mean pooling (the template's prefix and the
    # prompt, as sentence-transformers' Pooling(include_prompt=False) does); None: pool them all.
    pooling_skip: int | None = None


def resolve_prompt(config: RunConfig, manifest: Manifest) -> str | None:
    """The prompt to prepend: ``--prompt``, else ``--prompt-name`` from the manifest, else its default prompt."""
    if config.prompt is not None and config.prompt_name is not None:
        raise UsageError("--prompt and --prompt-name exclude each other: give one")
    if (config.prompt is not None or config.prompt_name is not None) and manifest.task != "embed":
        raise UsageError(f"--prompt and --prompt-name apply to embed models; this is a {manifest.task} model")
    if config.prompt is not None:
        return config.prompt
    if config.prompt_name is not None:
        if config.prompt_name not in manifest.prompts:
            known = ", ".join(sorted(manifest.prompts)) or "none (the export's sentence-transformers config has no prompts)"
            raise UsageError(f"--prompt-name {config.prompt_name!r}: the model's prompts are {known}")
        return manifest.prompts[config.prompt_name]
    if manifest.task == "embed" and manifest.default_prompt_name is not None:
        return manifest.prompts.get(manifest.default_prompt_name) or None
    return None


def check_text_options(config: RunConfig, manifest: Manifest) -> None:
    """Usage checks of ``--chunking`` and ``--chunk-overlap`` that need no tokenizer."""
    if config.chunking == "off":
        return
    if manifest.task != "embed":
        raise UsageError(f"--chunking applies to embed models; this is a {manifest.task} model")
    if config.text_pair_column is not None:
        raise UsageError("--chunking cuts single texts; it cannot be combined with --text-pair-column")
    if config.chunking == "mean" and manifest.token_embeddings:
        raise UsageError("--chunking mean averages pooled embeddings; per-token outputs (--token-embeddings exports) need --chunking rows")
    if config.chunk_overlap < 0:
        raise UsageError(f"--chunk-overlap must be 0 or more, got {config.chunk_overlap}")


def template_of(tokenizer: Tokenizer) -> Template:
    """The special tokens the tokenizer's post-processor puts around one segment."""
    framed = tokenizer.encode("a").ids
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return Template(tuple(framed[:start]), tuple(framed[start + len(bare) :]))
    raise UsageError("--chunking: cannot find where this tokenizer puts a text between its special tokens")


def plan_text(config: RunConfig, manifest: Manifest, tokenizer: Tokenizer, max_length: int) -> TextPlan:
    """The job's text plan; raises ``UsageError`` when a chunk would have no room for text."""
    check_text_options(config, manifest)
    prompt = resolve_prompt(config, manifest)
    prompt_ids = tuple(tokenizer.encode(prompt, add_special_tokens=False).ids) if prompt else ()
    template = template_of(tokenizer)
    if config.chunking != "off":
        try:
            length = chunk_length(max_length, template, len(prompt_ids))
        except ValueError as error:
            raise UsageError(f"--chunking: {error}; use a shorter prompt or a larger --max-length") from error
        if config.chunk_overlap >= length:
            raise UsageError(f"--chunk-overlap {config.chunk_overlap} must be smaller than the chunk ({length} tokens)")
    skip = len(template.prefix) + len(prompt_ids) if prompt and POOLING_MASK in manifest.inputs else None
    return TextPlan(max_length, config.chunking, config.chunk_overlap, prompt, prompt_ids, template, skip)


def tokenize_units(
    plan: TextPlan, tokenizer: Tokenizer, texts: Sequence[str | None], pairs: Sequence[str | None] | None = None
) -> tuple[TokenizedRows, ChunkedWindow | None]:
    """A window's model units: its rows (truncated by the tokenizer), or its rows' chunks.

    Chunking needs a tokenizer loaded without truncation (``load_tokenizer(path, None)``):
    every token of a text is in one chunk or more.
    """
    prompt = plan.prompt or ""
    if plan.chunking == "off":
        prompted = [None if text is None else prompt + text for text in texts] if prompt else texts
        return tokenize_window(tokenizer, prompted, pairs), None
    null = np.fromiter((text is None for text in texts), dtype=bool, count=len(texts))
    # encode_batch, not encode_batch_fast: chunks need the character offsets. The prompt is
    # tokenized with the text, as sentence-transformers does, and its tokens counted off the front.
    encodings = tokenizer.encode_batch([prompt + (text or "") for text in texts], add_special_tokens=False)
    skip = len(plan.prompt_ids)
    chunks = chunk_window(
        [encoding.ids[skip:] for encoding in encodings],
        [encoding.offsets[skip:] for encoding in encodings],
        null,
        plan.template,
        plan.max_length,
        plan.chunk_overlap,
        prompt_ids=plan.prompt_ids,
        offset_shift=len(prompt),
    )
    units = TokenizedRows(
        token_ids=chunks.token_ids,
        type_ids=None,
        truncated=np.zeros(len(chunks.token_ids), dtype=bool),
        null=chunks.null,
        chunks=chunks,
    )
    return units, chunks
