"""The tokenizer.json written into a model directory: published bert-base-uncased ids,
and no padding or truncation baked in (the worker sets both per run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from exporter.export import ExportResult
from exporter.source import load_tokenizer, resolve_source, tokenizer_max_length
from worker.modeldir.manifest import TOKENIZER_FILE

EXPORTS = ["tiny_embed_export", "tiny_fill_mask_export", "tiny_classify_export"]
KNOWN_IDS = [
    ("i love kathmandu", [101, 1045, 2293, 28045, 102]),
    ("Sinan loves a beautiful day", [101, 8254, 2319, 7459, 1037, 3376, 2154, 102]),
]


def load_exported(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(directory / TOKENIZER_FILE))


@pytest.mark.parametrize("export_fixture", EXPORTS)
@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS)
def test_exported_tokenizer_gives_the_published_ids(
    export_fixture: str, text: str, ids: list[int], request: pytest.FixtureRequest
) -> None:
    result: ExportResult = request.getfixturevalue(export_fixture)
    tokenizer = load_exported(result.directory)
    encoding = tokenizer.encode(text)

    assert encoding.ids == ids
    assert encoding.attention_mask == [1] * len(ids)
    assert encoding.type_ids == [0] * len(ids)


def test_exported_tokenizer_has_padding_and_truncation_off(
    tiny_embed_export: ExportResult, tiny_base_checkpoint: Path
) -> None:
    source = json.loads((tiny_base_checkpoint / TOKENIZER_FILE).read_text(encoding="utf-8"))
    # The source (the packaged MiniLM's tokenizer.json) pads and truncates to 128: the export must not.
    assert source["padding"] is not None and source["truncation"] is not None

    saved = json.loads((tiny_embed_export.directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert saved["padding"] is None
    assert saved["truncation"] is None

    tokenizer = load_exported(tiny_embed_export.directory)
    assert len(tokenizer.encode("short").ids) == 3
    assert len(tokenizer.encode("word " * 300).ids) == 302


def test_exported_tokenizer_knows_the_manifest_special_tokens(tiny_fill_mask_export: ExportResult) -> None:
    tokenizer = load_exported(tiny_fill_mask_export.directory)
    special = tiny_fill_mask_export.manifest.special_tokens
    tokens = {"[CLS]": special.cls, "[SEP]": special.sep, "[PAD]": special.pad, "[MASK]": special.mask, "[UNK]": special.unk}
    for token, token_id in tokens.items():
        assert tokenizer.token_to_id(token) == token_id, token
    assert tokenizer.encode("paris is the [MASK] of france").ids[4] == special.mask


def test_a_checkpoint_without_tokenizer_json_gets_the_same_fast_tokenizer(
    tmp_path: Path, tiny_base_checkpoint: Path
) -> None:
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tiny_base_checkpoint / name, tmp_path / name)
    resolved = resolve_source(str(tmp_path))

    tokenizer = load_tokenizer(resolved)

    assert tokenizer.encode("i love kathmandu").ids == [101, 1045, 2293, 28045, 102]
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert tokenizer_max_length(resolved) == 512
