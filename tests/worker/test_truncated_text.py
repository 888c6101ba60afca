"""Truncated rows are not tokenized whole: a long text is cut to a prefix that gives the same tokens.

The reference is the tokenizer itself on the whole text, for the exported BERT WordPiece tokenizer and
for byte-level BPE and Metaspace Unigram tokenizers trained here; the memory of five 10 MB rows is
measured in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from exporter.export import ExportResult
from worker.tokenize import load_tokenizer, tokenize_window

WORDS = ["river", "stone", "ember", "north", "lighthouse", "ß", "北京", "🙂", "naïve", "co-op", "it's", "1984", "!!", "\u200b"]


def long_texts(seed: int, words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    separators = [" ", " ", " ", "\n", "\t", "  "]
    plain = "".join(f"{rng.choice(WORDS)}{rng.choice(separators)}" for _ in range(words))
    spaces_then_words = " " * 40_000 + plain[:2000]  # a prefix without tokens: falls back to the whole text
    one_word = "x" * 60_000 + " river stone"  # no whitespace inside the prefix: the whole text too
    return [plain, plain[: len(plain) // 3], spaces_then_words, one_word, "short text", ""]


def trained(kind: str, max_length: int) -> Tokenizer:
    corpus = [" ".join(WORDS)] * 20
    if kind == "byte-level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<unk>"], unk_token="<unk>"))
    tokenizer.enable_truncation(max_length)
    return tokenizer


@pytest.mark.parametrize("kind", ["wordpiece", "byte-level", "unigram"])
def test_a_cut_text_gives_the_whole_texts_tokens(kind: str, tiny_embed_export: ExportResult) -> None:
    if kind == "wordpiece":
        tokenizer = load_tokenizer(tiny_embed_export.directory / "tokenizer.json", 128)
    else:
        tokenizer = trained(kind, 128)
    texts = long_texts(1, 10_000)
    got = tokenize_window(tokenizer, texts)
    expected = [tokenizer.encode(text) for text in texts]  # the whole text, truncated by the tokenizer
    assert got.token_ids == [encoding.ids for encoding in expected]
    assert got.truncated.tolist() == [bool(encoding.overflowing) for encoding in expected]
    assert got.truncated.tolist()[:3] == [True, True, True]  # the huge word is one [UNK] in WordPiece: not even truncated


def test_five_rows_of_ten_megabytes_fit_in_little_memory(tiny_embed_export: ExportResult, tmp_path: Path) -> None:
    script = f"""
import json, resource, sys
from worker.tokenize import load_tokenizer, tokenize_window
tokenizer = load_tokenizer({str(tiny_embed_export.directory / "tokenizer.json")!r}, 128)
texts = [("river stone ember north lighthouse " * 300_000)[: 10_000_000] for _ in range(5)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
window = tokenize_window(tokenizer, texts)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"kib": after - before, "lengths": window.lengths.tolist(), "truncated": window.truncated.tolist()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout)
    assert measured["lengths"] == [128] * 5 and measured["truncated"] == [True] * 5
    assert measured["kib"] < 200 * 1024, f"tokenizing grew the process by {measured['kib'] // 1024} MiB"  # whole: about 2.8 GB


def test_windows_are_bounded_by_bytes_as_well_as_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import worker.source
    from worker.source import inspect_inputs, plan_shards, read_shard

    path = tmp_path / "wide.parquet"
    rng = np.random.default_rng(0)
    wide_texts = ["".join(rng.choice(list("abcdefgh"), size=1000)) for _ in range(100)]  # distinct: no dictionary
    pq.write_table(pa.table({"text": wide_texts + ["short"] * 100}), path, row_group_size=100)
    monkeypatch.setattr(worker.source, "WINDOW_BYTES", 10_000)
    files = inspect_inputs([path], "text", None, None)
    wide, narrow = plan_shards(files, rows_per_shard=100)
    sizes = [batch.num_rows for batch in read_shard(files[0], wide, batch_rows=4096)]
    assert sum(sizes) == 100 and len(sizes) in (11, 12) and max(sizes) <= 10  # 1 kB rows (and their lengths), 10 kB windows
    assert [batch.num_rows for batch in read_shard(files[0], narrow, batch_rows=4096)] == [100]
