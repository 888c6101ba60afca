"""Tiny random checkpoints of every BERT-family architecture, each with its family's own kind
of tokenizer, trained here with ``tokenizers`` on a few sentences and saved by the family's
transformers tokenizer class (``save_pretrained``), the way a hub checkpoint ships.

- WordPiece: BERT, DistilBERT, ELECTRA, MPNet (MPNet's ``<s>``/``</s>``/``<mask>`` specials)
- byte-level BPE: RoBERTa, ModernBERT (ModernBERT's ``[CLS]``/``[SEP]``/``[MASK]``)
- Unigram (SentencePiece-style, Metaspace): XLM-RoBERTa, CamemBERT, DeBERTa-v3
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "i love kathmandu and its temples",
    "Sinan loves a beautiful day in the mountains",
    "Offline batch inference turns GPU time into rows.",
    "What is the capital of Nepal? Kathmandu is the capital of Nepal.",
    "Parquet files hold columns, and row groups hold a few thousand rows each.",
    "Why does the model predict this label? Because the training data said so, mostly.",
    "emoji and numbers 3.14159 and e-mail someone@example.com",
    "Zürich, Malmö and São Paulo are cities; 東京 is one too.",
    "a much longer second segment that goes on for a while to make the pair uneven in length",
    "How are embeddings pooled? By averaging the token vectors of the real tokens.",
    "This is a test of the export, with a few more words.",
] * 4
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


@dataclass(frozen=True)
class Family:
    """How to build a tiny checkpoint of one ``model_type``."""

    model_type: str
    class_prefix: str  # transformers class names: <prefix>Model, <prefix>ForMaskedLM, ...
    tokenizer_kind: str  # wordpiece, mpnet-wordpiece, byte-bpe, modernbert-bpe, unigram-xlmr, unigram-deberta
    tokenizer_class: str
    config: dict[str, Any]


_COMMON = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "hidden_size": 32}
FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "Bert", "wordpiece", "BertTokenizer", {**_COMMON, "max_position_embeddings": 64}),
    "roberta": Family("roberta", "Roberta", "byte-bpe", "RobertaTokenizer",
                      {**_COMMON, "max_position_embeddings": 66, "type_vocab_size": 1, "pad_token_id": 1,
                       "bos_token_id": 0, "eos_token_id": 2}),
    "xlm-roberta": Family("xlm-roberta", "XLMRoberta", "unigram-xlmr", "XLMRobertaTokenizer",
                          {**_COMMON, "max_position_embeddings": 66, "type_vocab_size": 1, "pad_token_id": 1,
                           "bos_token_id": 0, "eos_token_id": 2}),
    "camembert": Family("camembert", "Camembert", "unigram-xlmr", "CamembertTokenizer",
                        {**_COMMON, "max_position_embeddings": 66, "type_vocab_size": 1, "pad_token_id": 1,
                         "bos_token_id": 0, "eos_token_id": 2}),
    "distilbert": Family("distilbert", "DistilBert", "wordpiece", "DistilBertTokenizer",
                         {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 64,
                          "pad_token_id": 0}),
    "electra": Family("electra", "Electra", "wordpiece", "ElectraTokenizer",
                      {**_COMMON, "embedding_size": 16, "max_position_embeddings": 64}),
    "deberta-v2": Family("deberta-v2", "DebertaV2", "unigram-deberta", "DebertaV2Tokenizer",
                         {**_COMMON, "max_position_embeddings": 64, "type_vocab_size": 0, "relative_attention": True,
                          "position_buckets": 16, "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
                          "position_biased_input": False, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                          "pad_token_id": 0, "legacy": False}),
    "mpnet": Family("mpnet", "MPNet", "mpnet-wordpiece", "MPNetTokenizer",
                    {**_COMMON, "max_position_embeddings": 66, "pad_token_id": 1}),
    "modernbert": Family("modernbert", "ModernBert", "modernbert-bpe", "TokenizersBackend",
                         {**_COMMON, "max_position_embeddings": 64, "global_attn_every_n_layers": 2,
                          "local_attention": 8}),
}


def train_tokenizer(kind: str) -> Any:
    """A transformers (fast) tokenizer of the family's kind, with a vocabulary trained on ``CORPUS``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind in ("wordpiece", "mpnet-wordpiece"):
        specials = BERT_SPECIALS if kind == "wordpiece" else ("<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>")
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=list(specials)))
        return json.loads(tokenizer.to_str())["model"]["vocab"]
    if kind in ("byte-bpe", "modernbert-bpe"):
        specials = ROBERTA_SPECIALS if kind == "byte-bpe" else ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(CORPUS, trainer)
        if kind == "byte-bpe":
            model = json.loads(tokenizer.to_str())["model"]
            return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
            unk_token="[UNK]", model_input_names=["input_ids", "attention_mask"],
        )
    specials = ("<s>", "<pad>", "</s>", "<unk>") if kind == "unigram-xlmr" else ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=list(specials), unk_token=specials[3])
    tokenizer.train_from_iterator(CORPUS, trainer)
    vocab = [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]
    return vocab + [("<mask>" if kind == "unigram-xlmr" else "[MASK]", 0.0)]


def family_tokenizer(family: Family) -> Any:
    import transformers

    trained = train_tokenizer(family.tokenizer_kind)
    if not isinstance(trained, (dict, list, tuple)):
        return trained
    tokenizer_class = getattr(transformers, family.tokenizer_class)
    if family.tokenizer_kind == "byte-bpe":
        vocab, merges = trained
        return tokenizer_class(vocab=vocab, merges=merges)
    if family.tokenizer_kind == "unigram-deberta":
        return tokenizer_class(vocab=trained, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")
    return tokenizer_class(vocab=trained)


def save_family_checkpoint(directory: Path, model_type: str, task: str, initializer_range: float = 0.2) -> Path:
    """Save a tiny random ``model_type`` model for ``task`` (embed, fill-mask, classify, token-classify) and its tokenizer.

    ``initializer_range`` 0.2 makes outputs decisive: fills and labels stand out far beyond float error.
    """
    import torch
    import transformers

    family = FAMILIES[model_type]
    tokenizer = family_tokenizer(family)
    settings: dict[str, Any] = {**family.config, "vocab_size": len(tokenizer), "initializer_range": initializer_range}
    # The config's special ids are the tokenizer's (RoBERTa-style positions start after pad_token_id).
    for name in ("cls", "sep", "bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            settings.setdefault(f"{name}_token_id", token_id)
    settings["pad_token_id"] = tokenizer.pad_token_id
    if task == "classify":
        settings.update(num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if task == "token-classify":
        settings.update(num_labels=len(NER_LABELS), id2label=NER_LABELS, label2id={v: k for k, v in NER_LABELS.items()})
    config = getattr(transformers, f"{family.class_prefix}Config")(**settings)
    model_class = {
        "embed": "Model",
        "fill-mask": "ForMaskedLM",
        "classify": "ForSequenceClassification",
        "token-classify": "ForTokenClassification",
    }[task]
    torch.manual_seed(0)
    model = getattr(transformers, f"{family.class_prefix}{model_class}")(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
