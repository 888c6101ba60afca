"""Tokenizing through an export's ``tokenizer.json`` gives the published bert-base-uncased ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from exporter.export import ExportResult
from worker.errors import ModelDirError
from worker.tokenize import load_tokenizer, tokenize_window

I_LOVE_KATHMANDU = [101, 1045, 2293, 28045, 102]
SINAN_LOVES = [101, 8254, 2319, 7459, 1037, 3376, 2154, 102]


@pytest.fixture(scope="module")
def tokenizer(tiny_embed_export: ExportResult) -> Tokenizer:
    return load_tokenizer(tiny_embed_export.directory / "tokenizer.json", tiny_embed_export.manifest.max_length)


def test_known_bert_base_uncased_ids(tokenizer: Tokenizer) -> None:
    window = tokenize_window(tokenizer, ["i love kathmandu", "Sinan loves a beautiful day"])
    assert window.token_ids == [I_LOVE_KATHMANDU, SINAN_LOVES]
    assert window.type_ids is None  # one segment: all zeros, left to padding
    assert window.lengths.tolist() == [5, 8]
    assert window.truncated.tolist() == [False, False]
    assert window.null.tolist() == [False, False]


def test_no_padding_is_added(tokenizer: Tokenizer) -> None:
    # Padding is the batcher's job; a padded encoding would change every length.
    window = tokenize_window(tokenizer, ["a", "i love kathmandu and the hills around it"])
    assert window.token_ids[0] == [101, 1037, 102]


def test_pairs_get_type_ids_zero_then_one(tokenizer: Tokenizer) -> None:
    window = tokenize_window(tokenizer, ["i love kathmandu"], ["Sinan loves a beautiful day"])
    assert window.token_ids == [I_LOVE_KATHMANDU + SINAN_LOVES[1:]]
    assert window.type_ids == [[0] * 5 + [1] * 7]


def test_truncation_at_max_length_is_flagged(tiny_embed_export: ExportResult) -> None:
    tokenizer = load_tokenizer(tiny_embed_export.directory / "tokenizer.json", 5)
    window = tokenize_window(tokenizer, ["Sinan loves a beautiful day", "i love kathmandu", "a b"])
    assert window.token_ids == [[101, 8254, 2319, 7459, 102], I_LOVE_KATHMANDU, [101, 1037, 1038, 102]]
    # Exactly max_length tokens is not truncated.
    assert window.truncated.tolist() == [True, False, False]


def test_pair_truncation_is_flagged(tiny_embed_export: ExportResult) -> None:
    tokenizer = load_tokenizer(tiny_embed_export.directory / "tokenizer.json", 8)
    window = tokenize_window(tokenizer, ["i love kathmandu", "a"], ["Sinan loves a beautiful day", "b"])
    assert [len(ids) for ids in window.token_ids] == [8, 5]
    assert window.token_ids[0][0] == 101 and window.token_ids[0][-1] == 102
    assert window.truncated.tolist() == [True, False]


def test_null_texts_are_flagged_and_tokenized_as_empty(tokenizer: Tokenizer) -> None:
    window = tokenize_window(tokenizer, [None, "", "i love kathmandu"])
    assert window.null.tolist() == [True, False, False]
    assert window.token_ids == [[101, 102], [101, 102], I_LOVE_KATHMANDU]


def test_a_null_in_either_segment_flags_the_row(tokenizer: Tokenizer) -> None:
    window = tokenize_window(tokenizer, ["a", None, "a", ""], ["b", "b", None, ""])
    assert window.null.tolist() == [False, True, True, False]


def test_an_unreadable_tokenizer_file_is_a_model_dir_error(tmp_path: Path) -> None:
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        load_tokenizer(broken, 16)


def test_window_ids_equal_the_tokenizers_full_encode(tiny_embed_export: ExportResult) -> None:
    """The worker's tokenizing path (encode_batch_fast where it exists) gives encode_batch's ids, segments and
    truncation on hard text: accents, CJK, emoji, e-mail, control characters, overlong rows, pairs."""
    tokenizer = load_tokenizer(tiny_embed_export.directory / "tokenizer.json", 32)
    texts = ["Zürich, Malmö and São Paulo; 東京 🚀 someone@example.com", "tab\there\u200bzero-width", "", "x " * 100,
             "naïve café RÉSUMÉ", "i love kathmandu"]
    pairs = ["second segment", "", "and one more " * 20, "b", "Ελληνικά", "Sinan loves a beautiful day"]
    for window, expected in (
        (tokenize_window(tokenizer, texts), tokenizer.encode_batch(texts)),
        (tokenize_window(tokenizer, texts, pairs), tokenizer.encode_batch(list(zip(texts, pairs)))),
    ):
        assert window.token_ids == [encoding.ids for encoding in expected]
        assert window.truncated.tolist() == [bool(encoding.overflowing) for encoding in expected]
        if window.type_ids is not None:
            assert window.type_ids == [encoding.type_ids for encoding in expected]
        else:
            assert all(set(encoding.type_ids) == {0} for encoding in expected)
