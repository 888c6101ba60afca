"""Entities from per-token probabilities (worker/entities.py) against transformers' own
``pipeline("token-classification")`` on the same tiny checkpoint, for every aggregation strategy.

The worker side gets the windows the worker's tokenizer makes (``tokenizers``, with offsets and a
stride) and the per-token probabilities PyTorch computes for them; the pipeline tokenizes, runs and
aggregates on its own. Any difference in word starts, grouping, spans, stride merging or scores fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.entities import (
    AGGREGATIONS,
    Aggregation,
    Entity,
    TokenWindow,
    extract_entities,
    token_vocabulary,
)

MAX_LENGTH = 32
STRIDE = 8
TEXTS = (
    "Hugo Boss met Angela Merkel in Paris.",
    "tokenization of unbelievably antidisestablishmentarianism",  # words split into several subwords
    "Hello, world! (Really?) Yes: it's 3.14 -- or e-mail me@example.com.",  # punctuation
    "Zürich, Malmö, São Paulo, naïve café and cafe\u0301 with a combining accent",  # accents, NFD
    "東京は日本の首都です and 北京 too",  # CJK: one token per character
    "launch 🚀🔥 now 👍🏽 ok",  # emoji: [UNK] tokens
    "  a   b\t\tc\n\nd   spaced    out  ",  # runs of whitespace, leading and trailing
    "",
    "x",
)
# Longer than MAX_LENGTH tokens: truncated without a stride, windows merged with one.
LONG_TEXT = " ".join(
    ["Angela Merkel met Hugo Boss in Zürich on a tokenization day, then flew to 東京 🚀."] * 4
)


@pytest.fixture(scope="session")
def token_model(tiny_token_classifier_checkpoint: Path) -> Any:
    import transformers

    return transformers.BertForTokenClassification.from_pretrained(tiny_token_classifier_checkpoint).eval()


def pipeline_for(checkpoint: Path, model: Any, aggregation: Aggregation, plain_pieces: bool = False) -> Any:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=MAX_LENGTH)
    if plain_pieces:
        tokenizer.backend_tokenizer.model.continuing_subword_prefix = ""
    return transformers.pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation)


def worker_tokenizer(checkpoint: Path, stride: int | None, plain_pieces: bool = False) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_LENGTH, stride=stride or 0)
    if plain_pieces:
        tokenizer.model.continuing_subword_prefix = ""
    return tokenizer


def worker_entities(
    tokenizer: Any, model: Any, text: str, aggregation: Aggregation, stride: int | None, ignore: tuple[str, ...] = ("O",)
) -> list[Entity]:
    import torch

    encoding = tokenizer.encode(text)
    encodings = [encoding, *encoding.overflowing] if stride else [encoding]
    windows = []
    for window in encodings:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window.ids]), attention_mask=torch.ones(1, len(window.ids), dtype=torch.long)).logits[0]
        windows.append(TokenWindow(window.ids, window.offsets, window.special_tokens_mask, torch.softmax(logits, -1).numpy()))
    vocabulary = token_vocabulary(tokenizer, model.config.id2label, tokenizer.token_to_id("[UNK]"))
    return extract_entities(text, windows, vocabulary, aggregation, ignore)


def assert_same_entities(ours: list[Entity], theirs: list[dict[str, Any]], text: str, aggregation: Aggregation) -> None:
    key = "entity" if aggregation == "none" else "entity_group"
    assert [(e.label, e.start, e.end) for e in ours] == [(e[key], e["start"], e["end"]) for e in theirs], text
    np.testing.assert_allclose([e.score for e in ours], [float(e["score"]) for e in theirs], rtol=0, atol=1e-5)
    for entity in ours:
        assert entity.text == text[entity.start : entity.end]
    assert [e.start for e in ours] == sorted(e.start for e in ours)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_entities_match_the_pipeline(tiny_token_classifier_checkpoint: Path, token_model: Any, aggregation: Aggregation) -> None:
    pipe = pipeline_for(tiny_token_classifier_checkpoint, token_model, aggregation)
    tokenizer = worker_tokenizer(tiny_token_classifier_checkpoint, None)
    for text in (*TEXTS, LONG_TEXT):
        assert_same_entities(worker_entities(tokenizer, token_model, text, aggregation, None), pipe(text), text, aggregation)


@pytest.mark.parametrize("aggregation", [a for a in AGGREGATIONS if a != "none"])
def test_a_long_row_with_a_stride_matches_the_pipelines_stride(
    tiny_token_classifier_checkpoint: Path, token_model: Any, aggregation: Aggregation
) -> None:
    pipe = pipeline_for(tiny_token_classifier_checkpoint, token_model, aggregation)
    tokenizer = worker_tokenizer(tiny_token_classifier_checkpoint, STRIDE)
    ours = worker_entities(tokenizer, token_model, LONG_TEXT, aggregation, STRIDE)
    assert_same_entities(ours, pipe(LONG_TEXT, stride=STRIDE), LONG_TEXT, aggregation)
    # The stride reaches past the first window: entities beyond what truncation keeps.
    truncated = worker_entities(worker_tokenizer(tiny_token_classifier_checkpoint, None), token_model, LONG_TEXT, aggregation, None)
    assert max(e.end for e in ours) > max(e.end for e in truncated) + 100


@pytest.mark.parametrize("aggregation", ["first", "average", "max"])
def test_the_fallback_word_rule_for_tokenizers_without_a_subword_prefix(
    tiny_token_classifier_checkpoint: Path, token_model: Any, aggregation: Aggregation
) -> None:
    # Without a continuing-subword prefix the pipeline guesses word starts from the spaces around a token.
    pipe = pipeline_for(tiny_token_classifier_checkpoint, token_model, aggregation, plain_pieces=True)
    tokenizer = worker_tokenizer(tiny_token_classifier_checkpoint, None, plain_pieces=True)
    assert not token_vocabulary(tokenizer, token_model.config.id2label, None).word_aware
    with pytest.warns(UserWarning, match="fallback heuristic"):
        for text in TEXTS:
            assert_same_entities(worker_entities(tokenizer, token_model, text, aggregation, None), pipe(text), text, aggregation)


def test_ignore_labels_match_the_pipeline(tiny_token_classifier_checkpoint: Path, token_model: Any) -> None:
    pipe = pipeline_for(tiny_token_classifier_checkpoint, token_model, "simple")
    tokenizer = worker_tokenizer(tiny_token_classifier_checkpoint, None)
    kept: set[str] = set()
    for text in TEXTS[:4]:
        for ignore in ((), ("O", "PER"), ("LOC",)):
            ours = worker_entities(tokenizer, token_model, text, "simple", None, ignore)
            assert_same_entities(ours, pipe(text, ignore_labels=list(ignore)), text, "simple")
            if not ignore:
                kept.update(e.label for e in ours)
    assert {"O", "PER", "LOC"} <= kept


def test_the_checkpoint_makes_the_strategies_differ(tiny_token_classifier_checkpoint: Path, token_model: Any) -> None:
    """The comparisons above can fail: on these texts each strategy gives different entities,
    labels are far from ties, and several labels and multi-token entities occur."""
    import torch

    tokenizer = worker_tokenizer(tiny_token_classifier_checkpoint, None)
    results = {
        aggregation: [(e.label, e.start, e.end) for text in TEXTS for e in worker_entities(tokenizer, token_model, text, aggregation, None)]
        for aggregation in AGGREGATIONS
    }
    assert len({tuple(found) for found in results.values()}) == len(AGGREGATIONS)
    assert len({label for label, _, _ in results["simple"]}) >= 3
    assert any(end - start > 6 and " " in text[start:end] for text in TEXTS for label, start, end in
               [(e.label, e.start, e.end) for e in worker_entities(tokenizer, token_model, text, "simple", None)])
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        with torch.no_grad():
            probabilities = torch.softmax(token_model(input_ids=torch.tensor([ids])).logits[0], -1).numpy()
        top_two = np.sort(probabilities, axis=-1)[:, -2:]
        assert (top_two[:, 1] - top_two[:, 0]).min() > 1e-3, text


def test_aggregation_none_refuses_several_windows() -> None:
    window = TokenWindow([101, 102], [(0, 0), (0, 0)], [1, 1], np.ones((2, 1), np.float32))
    vocabulary = token_vocabulary(_FakeTokenizer(), {0: "O"}, None)
    with pytest.raises(ValueError, match="stride"):
        extract_entities("", [window, window], vocabulary, "none")


class _FakeTokenizer:
    model = None

    def get_vocab_size(self, with_added_tokens: bool) -> int:
        return 103

    def id_to_token(self, index: int) -> str:
        return f"t{index}"
