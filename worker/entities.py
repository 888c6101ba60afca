"""Token classification: per-token probabilities to entities with character spans. Pure numpy.

This reproduces transformers' ``TokenClassificationPipeline`` (``gather_pre_entities``,
``aggregate``, ``aggregate_words``, ``group_entities`` and, for rows split into
overlapping windows, ``aggregate_overlapping_entities``) step for step, including
its quirks, so a user gets the entities the pipeline would give for the same
checkpoint. Only the entity's ``text`` differs from the pipeline's ``word``: it is
the row's own characters ``text[start:end]``, not the decoded tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
import numpy as np

from worker.config import Aggregation

AGGREGATIONS: tuple[Aggregation, ...] = ("none", "simple", "first", "average", "max")
DEFAULT_IGNORE_LABELS: tuple[str, ...] = ("O",)


@dataclass(frozen=True)
class TokenVocabulary:
    """What the pipeline looks up in the tokenizer and the model config while it aggregates.

    ``word_aware`` is true when the tokenizer's model marks word continuations (WordPiece's
    ``##``, a BPE ``continuing_subword_prefix``): a token then starts a word when its string is
    as long as the text it covers. Otherwise the pipeline falls back to "no space before it".
    """

    id2label: Mapping[int, str]
    tokens: Sequence[str]  # token string by id
    unk_id: int | None
    word_aware: bool


def token_vocabulary(tokenizer: object, id2label: Mapping[int, str], unk_id: int | None) -> TokenVocabulary:
    """The vocabulary facts of a ``tokenizers.Tokenizer`` (duck-typed: this module imports no tokenizer)."""
    id_to_token = getattr(tokenizer, "id_to_token")
    size = int(getattr(tokenizer, "get_vocab_size")(with_added_tokens=True))
    # The pipeline asks the same question: getattr(tokenizer._tokenizer.model, "continuing_subword_prefix", None).
    prefix = getattr(getattr(tokenizer, "model", None), "continuing_subword_prefix", None)
    return TokenVocabulary(
        id2label=dict(id2label),
        tokens=[id_to_token(i) or "" for i in range(size)],
        unk_id=unk_id,
        word_aware=bool(prefix),
    )


@dataclass(frozen=True)
class TokenWindow:
    """One model window of a row: its tokens, their character offsets into the row's text, and
    the model's per-token probabilities (``scores``: tokens x labels)."""

    token_ids: Sequence[int]
    offsets: Sequence[tuple[int, int]]
    special_tokens_mask: Sequence[int]
    scores: np.ndarray


@dataclass(frozen=True)
class TokenOffsets:
    """What the tokenizer tells about a window of rows beyond the token ids: the rows' texts and,
    per sequence, its tokens' character offsets into its row's text and its special-tokens mask.

    ``sequence_rows`` is the row of each sequence when a stride split long rows into several
    overlapping sequences; ``None`` when sequence i is row i.
    """

    texts: Sequence[str | None]
    token_ids: Sequence[Sequence[int]]
    offsets: Sequence[Sequence[tuple[int, int]]]
    special_tokens_mask: Sequence[Sequence[int]]
    sequence_rows: np.ndarray | None = None

    def row_of(self, sequence: int) -> int:
        return sequence if self.sequence_rows is None else int(self.sequence_rows[sequence])

    def window(self, sequence: int, scores: np.ndarray) -> TokenWindow:
        return TokenWindow(self.token_ids[sequence], self.offsets[sequence], self.special_tokens_mask[sequence], scores)


@dataclass(frozen=True)
class Entity:
    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass
class _Token:
    label: str  # after aggregation, the label chosen for this token or word
    score: float
    start: int
    end: int


@dataclass
class _PreEntity:
    token: str
    scores: np.ndarray
    start: int
    end: int
    is_subword: bool


def extract_entities(
    text: str,
    windows: Sequence[TokenWindow],
    vocabulary: TokenVocabulary,
    aggregation: Aggregation = "simple",
    ignore_labels: Collection[str] = DEFAULT_IGNORE_LABELS,
) -> list[Entity]:
    """The row's entities, sorted by ``start``, as the pipeline's postprocess gives them.

    Several windows (a long row split with a stride) are aggregated one by one and their
    entities merged where they overlap, keeping the longer one (the higher score on a tie).
    """
    if aggregation == "none" and len(windows) > 1:
        raise ValueError("aggregation 'none' cannot merge overlapping windows (the pipeline refuses stride with it)")
    found: list[_Token] = []
    for window in windows:
        pre_entities = _gather_pre_entities(text, window, vocabulary)
        tokens = _aggregate(pre_entities, aggregation, vocabulary.id2label)
        found.extend(token for token in tokens if token.label not in ignore_labels)
    if len(windows) > 1:
        found = _merge_overlapping(found)
    # Python's sort is stable: tokens sharing a start keep the pipeline's token order.
    found.sort(key=lambda token: token.start)
    return [Entity(token.label, float(token.score), token.start, token.end, text[token.start : token.end]) for token in found]


def _gather_pre_entities(text: str, window: TokenWindow, vocabulary: TokenVocabulary) -> list[_PreEntity]:
    pre_entities = []
    for index, token_scores in enumerate(window.scores):
        if window.special_tokens_mask[index]:
            continue
        token_id = int(window.token_ids[index])
        token = vocabulary.tokens[token_id]
        start, end = (int(value) for value in window.offsets[index])
        covered = text[start:end]
        if vocabulary.word_aware:
            is_subword = len(token) != len(covered)
        else:
            # The pipeline's fallback heuristic for tokenizers that do not mark word pieces.
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == vocabulary.unk_id:
            token = covered
            is_subword = False
        pre_entities.append(_PreEntity(token, token_scores, start, end, is_subword))
    return pre_entities


def _aggregate(pre_entities: list[_PreEntity], aggregation: Aggregation, id2label: Mapping[int, str]) -> list[_Token]:
    if aggregation in ("none", "simple"):
        tokens = []
        for pre_entity in pre_entities:
            label_id = int(pre_entity.scores.argmax())
            tokens.append(_Token(id2label[label_id], pre_entity.scores[label_id], pre_entity.start, pre_entity.end))
    else:
        tokens = _aggregate_words(pre_entities, aggregation, id2label)
    if aggregation == "none":
        return tokens
    return _group_entities(tokens)


def _aggregate_words(pre_entities: list[_PreEntity], aggregation: Aggregation, id2label: Mapping[int, str]) -> list[_Token]:
    """One label per word: a word is a token that is not a subword plus the subwords after it."""
    words: list[_Token] = []
    group: list[_PreEntity] = []
    for pre_entity in pre_entities:
        if group and not pre_entity.is_subword:
            words.append(_aggregate_word(group, aggregation, id2label))
            group = []
        group.append(pre_entity)
    if group:
        words.append(_aggregate_word(group, aggregation, id2label))
    return words


def _aggregate_word(group: list[_PreEntity], aggregation: Aggregation, id2label: Mapping[int, str]) -> _Token:
    if aggregation == "first":
        scores = group[0].scores
    elif aggregation == "max":
        scores = max(group, key=lambda pre_entity: pre_entity.scores.max()).scores
    elif aggregation == "average":
        scores = np.nanmean(np.stack([pre_entity.scores for pre_entity in group]), axis=0)
    else:
        raise ValueError(f"aggregation {aggregation!r} does not aggregate words")
    label_id = int(scores.argmax())
    return _Token(id2label[label_id], scores[label_id], group[0].start, group[-1].end)


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # not in B-/I- form: a continuation


def _group_entities(tokens: list[_Token]) -> list[_Token]:
    """Join adjacent tokens (or words) with the same tag, unless the later one begins (``B-``) a new entity."""
    groups: list[_Token] = []
    current: list[_Token] = []
    for token in tokens:
        if current:
            begins, tag = _tag(token.label)
            _, last_tag = _tag(current[-1].label)
            if tag != last_tag or begins == "B":
                groups.append(_group(current))
                current = []
        current.append(token)
    if current:
        groups.append(_group(current))
    return groups


def _group(tokens: list[_Token]) -> _Token:
    # The pipeline names the group by splitting the first label at its first "-" (so "B-PER" -> "PER",
    # and also "foo-bar" -> "bar"), which is not always the tag it grouped by.
    label = tokens[0].label.split("-", 1)[-1]
    score = np.mean(np.nanmean([token.score for token in tokens]))
    return _Token(label, score, tokens[0].start, tokens[-1].end)


def _merge_overlapping(tokens: list[_Token]) -> list[_Token]:
    """Entities found in two overlapping windows: keep the longer one, the higher score on a tie."""
    if not tokens:
        return tokens
    ordered = sorted(tokens, key=lambda token: token.start)
    merged = []
    previous = ordered[0]
    for token in ordered:
        if previous.start <= token.start < previous.end:
            length, previous_length = token.end - token.start, previous.end - previous.start
            if length > previous_length or (length == previous_length and token.score > previous.score):
                previous = token
        else:
            merged.append(previous)
            previous = token
    merged.append(previous)
    return merged
