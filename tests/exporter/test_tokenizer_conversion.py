"""Checkpoints that ship only a slow tokenizer's files get a tokenizer.json at export time,
checked against an independent reference: the ``sentencepiece`` library itself for a
SentencePiece model, the published bert-base-uncased ids for a ``vocab.txt``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from family_checkpoints import CORPUS
from test_families import _Cache, assert_matches_pytorch, family_export

from conftest import tokenizer_files_dir
from exporter.errors import TokenizerMismatch
from exporter.tokenizer import check_same_ids
from exporter.validation import SAMPLE_PAIRS, SAMPLE_TEXTS
from worker.modeldir.manifest import TOKENIZER_FILE
from worker.tokenize import load_tokenizer

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def slow_cache(tmp_path_factory: pytest.TempPathFactory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("slow-only"))


def save_sentencepiece_xlmr(directory: Path, task: str) -> Path:
    """An XLM-R checkpoint with only ``sentencepiece.bpe.model``, as xlm-roberta-base once shipped."""
    import sentencepiece
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(directory / "sp"), vocab_size=150, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2,
    )
    (directory / "sp.model").rename(directory / "sentencepiece.bpe.model")
    (directory / "sp.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(directory / "sentencepiece.bpe.model")).get_piece_size()
    config = transformers.XLMRobertaConfig(
        vocab_size=pieces + 2, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, initializer_range=0.2, **TINY
    )
    torch.manual_seed(0)
    model_class = transformers.XLMRobertaModel if task == "embed" else transformers.XLMRobertaForMaskedLM
    model_class(config).save_pretrained(directory)
    return directory


def fairseq_ids(directory: Path, text: str) -> list[int]:
    """XLM-R's ids from sentencepiece itself: fairseq puts <s>, <pad>, </s>, <unk> first and shifts pieces by one."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "sentencepiece.bpe.model"))
    return [0, *(piece + 1 if piece > 2 else 3 for piece in processor.encode(text)), 2]


@pytest.mark.parametrize("task", ["embed", "fill-mask"])
def test_a_sentencepiece_only_checkpoint_is_converted_and_gives_sentencepiece_ids(
    task: str, slow_cache: _Cache, tmp_path: Path
) -> None:
    checkpoint = slow_cache.get(("ckpt", task), lambda: save_sentencepiece_xlmr(slow_cache.root / task, task))
    assert not (checkpoint / TOKENIZER_FILE).exists()
    slow_cache.made[("checkpoint", "xlm-roberta", task)] = checkpoint
    result = family_export(slow_cache, "xlm-roberta", task)

    tokenizer = load_tokenizer(result.directory / TOKENIZER_FILE, 10_000)  # the worker's loader, no truncation here
    for text in SAMPLE_TEXTS:
        assert tokenizer.encode(text).ids == fairseq_ids(checkpoint, text), text
    assert result.manifest.special_tokens.mask == tokenizer.token_to_id("<mask>") == tokenizer.get_vocab_size() - 1
    assert_matches_pytorch(result, checkpoint, task, tmp_path)


def test_a_vocab_txt_only_checkpoint_gets_the_published_ids(tmp_path: Path) -> None:
    import torch
    import transformers

    checkpoint = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=30522, max_position_embeddings=64, **TINY)).save_pretrained(checkpoint)
    shutil.copyfile(tokenizer_files_dir() / "vocab.txt", checkpoint / "vocab.txt")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    cache = _Cache(tmp_path)
    cache.made[("checkpoint", "bert", "embed")] = checkpoint
    result = family_export(cache, "bert", "embed")

    tokenizer = load_tokenizer(result.directory / TOKENIZER_FILE, result.manifest.max_length)
    assert tokenizer.encode("i love kathmandu").ids == [101, 1045, 2293, 28045, 102]
    assert tokenizer.encode("Is it raining?", "No.").type_ids == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_a_tokenizer_json_that_differs_from_the_checkpoints_tokenizer_is_refused(tiny_base_checkpoint: Path) -> None:
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_file(str(tiny_base_checkpoint / TOKENIZER_FILE))
    tokenizer.no_padding()  # as the exporter and the worker load it (this file pads to 128)
    assert check_same_ids(tokenizer, tiny_base_checkpoint, "tiny", SAMPLE_TEXTS, SAMPLE_PAIRS) == 14
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)  # a cased tokenizer.json for an uncased model
    with pytest.raises(TokenizerMismatch, match=r"tiny: tokenizer.json gives ids .* for 'The quick brown fox"):
        check_same_ids(tokenizer, tiny_base_checkpoint, "tiny", SAMPLE_TEXTS, SAMPLE_PAIRS)
