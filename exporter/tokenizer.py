"""The checkpoint's tokenizer as one ``tokenizer.json``, for every kind of tokenizer.

WordPiece, byte-level BPE and SentencePiece (Unigram or BPE) tokenizers all run in the
worker through the Rust ``tokenizers`` library alone. A checkpoint that ships only the
files of a slow tokenizer (``vocab.txt``, ``vocab.json`` + ``merges.txt``,
``sentencepiece.bpe.model``, ``spm.model``) is converted here, at export time, with
transformers' converters (SentencePiece models need the ``sentencepiece`` package, an
exporter dependency only). Whichever way it came, the tokenizer the worker will use is
checked to give the same ids as the checkpoint's own transformers tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import SourceError, TokenizerMismatch

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@functools.lru_cache(maxsize=4)
def load_transformers_tokenizer(directory: Path, source: str) -> Any:
    """The checkpoint's own transformers tokenizer (read only: it is shared between callers)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, ImportError (no sentencepiece), ...
        raise SourceError(
            f"{source}: no tokenizer.json, and transformers cannot build one from the tokenizer files "
            f"({type(error).__name__}: {error}); SentencePiece models need `pip install sentencepiece`"
        ) from error


def convert_tokenizer(directory: Path, source: str) -> Tokenizer:
    """Build ``tokenizer.json``'s tokenizer from a slow-only checkpoint (transformers' converters)."""
    converted = load_transformers_tokenizer(directory, source)
    backend = getattr(converted, "backend_tokenizer", None)
    if backend is None:
        raise SourceError(
            f"{source}: transformers loads only a slow {type(converted).__name__} for this checkpoint and has no "
            "converter to a fast tokenizer; bertbatch needs tokenizer.json"
        )
    return backend


def check_same_ids(
    tokenizer: Tokenizer, directory: Path, source: str, texts: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> int:
    """Raise ``TokenizerMismatch`` unless ``tokenizer`` gives the transformers tokenizer's ids; return rows checked.

    Batches, because a single transformers call treats an empty text pair as no pair.
    """
    reference = load_transformers_tokenizer(directory, source)
    expected = reference(list(texts))["input_ids"] + reference([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]
    got = [e.ids for e in tokenizer.encode_batch(list(texts))] + [e.ids for e in tokenizer.encode_batch(list(pairs))]
    items: list[object] = [*texts, *pairs]
    for item, want, have in zip(items, expected, got):
        if list(want) != list(have):
            raise TokenizerMismatch(
                f"{source}: tokenizer.json gives ids {list(have)[:12]} for {item!r}, the checkpoint's "
                f"{type(reference).__name__} gives {list(want)[:12]}; the worker would tokenize differently "
                "from transformers. Report the checkpoint."
            )
    return len(items)


def declared_special_tokens(directory: Path, source: str) -> dict[str, str]:
    """The special tokens as the checkpoint's transformers tokenizer knows them: its files, else its class's
    defaults (``<s>``/``</s>``/``<mask>`` for XLM-R, which slow-only checkpoints often leave undeclared)."""
    tokenizer = load_transformers_tokenizer(directory, source)
    names = {}
    for key in ("cls", "sep", "pad", "mask", "unk"):
        value = getattr(tokenizer, f"{key}_token", None)
        if isinstance(value, str):
            names[key] = value
    return names
