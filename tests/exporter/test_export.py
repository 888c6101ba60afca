"""Exports of the tiny random checkpoints, run with onnxruntime on new padded batches.

The references are computed here, directly with transformers (``BertModel``,
``BertForMaskedLM``, ``BertForSequenceClassification``), not through
``exporter.heads``: a bug shared by the head and its validation shows up here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NER_LABELS

from exporter.export import ExportConfig, ExportResult, export_model
from worker.modeldir.manifest import MANIFEST_NAME, MODEL_FILE, TOKENIZER_FILE, SpecialTokens, read_manifest

# Every task with an export test below; tests/exporter/test_tasks.py fails if a registered task is missing.
TESTED_TASKS = ("embed", "fill-mask", "classify", "token-classify")
EXPORT_FIXTURES = {
    "embed": "tiny_embed_export",
    "fill-mask": "tiny_fill_mask_export",
    "classify": "tiny_classify_export",
    "token-classify": "tiny_token_classify_export",
}
CHECKPOINT_FIXTURES = {
    "embed": "tiny_base_checkpoint",
    "fill-mask": "tiny_mlm_checkpoint",
    "classify": "tiny_classifier_checkpoint",
    "token-classify": "tiny_token_classifier_checkpoint",
}
EXPECTED_OUTPUTS = {
    "embed": ("embedding",),
    "fill-mask": ("mask_positions", "top_scores", "top_ids"),
    "classify": ("probs", "logits"),
    "token-classify": ("token_probs",),
}
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# bert-base-uncased: [CLS]=101, [SEP]=102, [PAD]=0, [MASK]=103, [UNK]=100.
BERT_SPECIAL_TOKENS = SpecialTokens(cls=101, sep=102, pad=0, mask=103, unk=100)
HIDDEN_SIZE = 32  # of the tiny checkpoints in tests/conftest.py

# Different lengths on purpose: the shorter rows are padded.
TEXTS = (
    "i love kathmandu",
    "Sinan loves a beautiful day",
    "A",
    "The quick brown fox jumps over the lazy dog, and then naps in the afternoon sun for a while.",
    "Zürich, Malmö and 東京",
)
PAIRS = (
    ("What is the capital of Nepal?", "Kathmandu is the capital of Nepal."),
    ("Is it raining?", "No."),
)
MASKED_TEXTS = (
    "the capital of nepal is [MASK] .",
    "no mask in this row at all, just a longer sentence so that the others are padded",
    "i [MASK] kathmandu and [MASK] it every single day",
    "[MASK]",
)


def encode_padded(directory: Path, items: Sequence[str | tuple[str, str]]) -> dict[str, np.ndarray]:
    """Tokenize with the exported tokenizer.json and right-pad, the way any client would."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    tokenizer.enable_padding(pad_id=BERT_SPECIAL_TOKENS.pad, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(items))
    inputs = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    assert len(set(inputs["attention_mask"].sum(axis=1).tolist())) > 1, "the batch must mix lengths"
    return inputs


def run_onnx(result: ExportResult, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(result.directory / result.manifest.model_file), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    assert tuple(names) == result.manifest.outputs
    return dict(zip(names, session.run(names, inputs)))


def as_torch(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(array) for name, array in inputs.items()}


def reference_embedding(
    checkpoint: Path,
    inputs: dict[str, np.ndarray],
    pooling: str = "mean",
    normalize: bool = False,
    layers: str = "last",
) -> tuple[np.ndarray, np.ndarray]:
    """(pooled, per-token hidden) from BertModel, with the pooling written out here."""
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        output = model(**as_torch(inputs), output_hidden_states=True)
    states = output.hidden_states
    if layers == "last":
        hidden = output.last_hidden_state
    elif layers == "second-to-last":
        hidden = states[-2]
    elif layers == "sum-last-four":
        hidden = states[-1] + states[-2] + states[-3] + states[-4]
    else:
        hidden = torch.cat([states[-4], states[-3], states[-2], states[-1]], dim=-1)
    mask = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).float()
    if pooling == "mean":
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = output.pooler_output
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return pooled.numpy(), hidden.numpy()


def graph_dims(path: Path) -> tuple[dict[str, list[str | int]], dict[str, list[str | int]]]:
    """Input and output dims of the ONNX graph: a name for symbolic dims, an int for fixed ones."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(values: Any) -> dict[str, list[str | int]]:
        return {
            value.name: [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in values
        }

    return dims(graph.input), dims(graph.output)


def export(tmp_path: Path, checkpoint: Path, task: str, **options: Any) -> ExportResult:
    config = ExportConfig(source=str(checkpoint), task=task, out=tmp_path / "model", **options)  # type: ignore[arg-type]
    return export_model(config, log=lambda line: None)


# --- every task -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TESTED_TASKS)
def test_export_passes_validation_and_writes_the_model_directory(task: str, request: pytest.FixtureRequest) -> None:
    result: ExportResult = request.getfixturevalue(EXPORT_FIXTURES[task])

    assert result.report.passed, result.report.problems
    assert result.manifest.validated
    case_names = {case["name"] for case in result.report.cases}
    assert {"padded-batch", "batch-1", "sentence-pairs", "near-max-length"} <= case_names
    for name in (MODEL_FILE, TOKENIZER_FILE, MANIFEST_NAME, "vocab.txt", "config.json"):
        assert (result.directory / name).is_file(), name
    assert read_manifest(result.directory) == result.manifest
    siblings = {path.name for path in result.directory.parent.iterdir()}
    assert siblings == {result.directory.name}, "no .partial or .failed directory is left behind"


@pytest.mark.parametrize("task", TESTED_TASKS)
def test_manifest_fields(task: str, request: pytest.FixtureRequest) -> None:
    manifest = read_manifest(request.getfixturevalue(EXPORT_FIXTURES[task]).directory)
    checkpoint: Path = request.getfixturevalue(CHECKPOINT_FIXTURES[task])

    assert manifest.task == task
    assert manifest.source == str(checkpoint.resolve())
    assert manifest.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.outputs == EXPECTED_OUTPUTS[task]
    assert manifest.max_length == 128  # the tiny models' max_position_embeddings, below the tokenizer's 512
    assert manifest.special_tokens == BERT_SPECIAL_TOKENS
    assert manifest.opset == 17
    assert manifest.precision == "fp32"
    if task == "embed":
        assert (manifest.pooling, manifest.normalize, manifest.layers) == ("mean", False, "last")
        assert manifest.embedding_dim == HIDDEN_SIZE
        assert manifest.token_embeddings is False
    else:
        assert (manifest.pooling, manifest.layers, manifest.embedding_dim) == (None, None, None)
    assert manifest.top_k == (5 if task == "fill-mask" else None)
    assert manifest.id2label == {"classify": LABELS, "token-classify": NER_LABELS}.get(task)
    assert manifest.activation == ("softmax" if task == "classify" else None)  # three single-label classes
    assert manifest.subword_prefix == ("##" if task == "token-classify" else None)  # WordPiece


@pytest.mark.parametrize("task", TESTED_TASKS)
def test_onnx_batch_and_sequence_axes_are_dynamic(task: str, request: pytest.FixtureRequest) -> None:
    result: ExportResult = request.getfixturevalue(EXPORT_FIXTURES[task])
    inputs, outputs = graph_dims(result.directory / MODEL_FILE)

    assert list(inputs) == list(result.manifest.inputs)
    for name, dims in inputs.items():
        assert len(dims) == 2 and all(isinstance(d, str) and d for d in dims), f"{name}: {dims}"
    assert list(outputs) == list(result.manifest.outputs)
    for name, dims in outputs.items():
        assert isinstance(dims[0], str) and dims[0], f"{name}: first axis is fixed: {dims}"
    if task == "embed":
        assert outputs["embedding"][1] == result.manifest.embedding_dim
    if task == "classify":
        assert outputs["probs"][1] == outputs["logits"][1] == len(LABELS)
    if task == "token-classify":
        assert isinstance(outputs["token_probs"][1], str) and outputs["token_probs"][2] == len(NER_LABELS)
    if task == "fill-mask":
        assert outputs["top_ids"][1] == outputs["top_scores"][1] == result.manifest.top_k


def test_embed_matches_pytorch_mean_pooling(tiny_embed_export: ExportResult, tiny_base_checkpoint: Path) -> None:
    inputs = encode_padded(tiny_embed_export.directory, TEXTS)
    got = run_onnx(tiny_embed_export, inputs)["embedding"]
    expected, hidden = reference_embedding(tiny_base_checkpoint, inputs)

    assert got.shape == (len(TEXTS), HIDDEN_SIZE)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    # The batch is padded enough that averaging over padding too would be caught.
    assert not np.allclose(hidden.mean(axis=1), expected, atol=1e-3)


def test_embed_of_a_row_does_not_depend_on_its_batch(tiny_embed_export: ExportResult) -> None:
    batch = encode_padded(tiny_embed_export.directory, TEXTS)
    together = run_onnx(tiny_embed_export, batch)["embedding"]
    for row, text in enumerate(TEXTS[:2]):
        length = int(batch["attention_mask"][row].sum())
        alone = {name: array[row : row + 1, :length] for name, array in batch.items()}
        np.testing.assert_allclose(run_onnx(tiny_embed_export, alone)["embedding"][0], together[row], atol=1e-5)


def test_fill_mask_matches_pytorch_top_k(tiny_fill_mask_export: ExportResult, tiny_mlm_checkpoint: Path) -> None:
    import torch
    import transformers

    inputs = encode_padded(tiny_fill_mask_export.directory, MASKED_TEXTS)
    positions = np.argwhere(inputs["input_ids"] == BERT_SPECIAL_TOKENS.mask)
    assert len(positions) == 4
    got = run_onnx(tiny_fill_mask_export, inputs)

    model = transformers.BertForMaskedLM.from_pretrained(tiny_mlm_checkpoint).eval()
    with torch.no_grad():
        logits = model(**as_torch(inputs)).logits
    probabilities = torch.softmax(logits[positions[:, 0], positions[:, 1]], dim=-1)
    expected_scores, expected_ids = torch.topk(probabilities, k=5, dim=-1)

    np.testing.assert_array_equal(got["mask_positions"], positions)
    assert got["top_ids"].dtype == np.int64
    # The random tiny head gives probabilities near 1/30522, so compare relatively.
    np.testing.assert_allclose(got["top_scores"], expected_scores.numpy(), rtol=1e-4, atol=0)
    np.testing.assert_array_equal(got["top_ids"], expected_ids.numpy())
    # Each returned id has, under PyTorch's distribution, the score returned next to it.
    scores_of_ids = np.take_along_axis(probabilities.numpy(), got["top_ids"], axis=-1)
    np.testing.assert_allclose(scores_of_ids, got["top_scores"], rtol=1e-4, atol=0)


def test_fill_mask_without_any_mask_returns_empty_outputs(tiny_fill_mask_export: ExportResult) -> None:
    inputs = encode_padded(tiny_fill_mask_export.directory, TEXTS[:2])
    got = run_onnx(tiny_fill_mask_export, inputs)

    assert got["mask_positions"].shape == (0, 2)
    assert got["top_scores"].shape == got["top_ids"].shape == (0, 5)


def test_classify_matches_pytorch_softmax(tiny_classify_export: ExportResult, tiny_classifier_checkpoint: Path) -> None:
    import torch
    import transformers

    inputs = encode_padded(tiny_classify_export.directory, [*TEXTS, *PAIRS])
    assert inputs["token_type_ids"].any(), "sentence pairs put segment ids 1 in the batch"
    got = run_onnx(tiny_classify_export, inputs)["probs"]

    model = transformers.BertForSequenceClassification.from_pretrained(tiny_classifier_checkpoint).eval()
    with torch.no_grad():
        expected = torch.softmax(model(**as_torch(inputs)).logits, dim=-1).numpy()

    assert got.shape == (len(TEXTS) + len(PAIRS), len(LABELS))
    # Probabilities of the random tiny classifier sit close to 1/3: compare tightly.
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-6)


def test_token_classify_matches_pytorch_softmax_per_token(
    tiny_token_classify_export: ExportResult, tiny_token_classifier_checkpoint: Path
) -> None:
    import torch
    import transformers

    inputs = encode_padded(tiny_token_classify_export.directory, TEXTS)
    got = run_onnx(tiny_token_classify_export, inputs)["token_probs"]

    model = transformers.BertForTokenClassification.from_pretrained(tiny_token_classifier_checkpoint).eval()
    with torch.no_grad():
        expected = torch.softmax(model(**as_torch(inputs)).logits, dim=-1).numpy()

    assert got.shape == (*inputs["input_ids"].shape, len(NER_LABELS))
    valid = inputs["attention_mask"].astype(bool)  # padding positions are never read
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5)
    assert len(set(got[valid].argmax(-1).tolist())) >= 4, "the decisive tiny head predicts several labels"


# --- embedding options ----------------------------------------------------------------------------

EMBED_OPTIONS = [
    pytest.param({"pooling": "cls"}, "tiny_base_checkpoint", id="pooling-cls"),
    pytest.param({"pooling": "pooler"}, "tiny_base_checkpoint", id="pooling-pooler"),
    pytest.param({"normalize": True}, "tiny_base_checkpoint", id="normalize"),
    pytest.param({"layers": "second-to-last"}, "tiny_base_checkpoint", id="second-to-last"),
    pytest.param({"layers": "sum-last-four"}, "tiny_four_layer_checkpoint", id="sum-last-four"),
    pytest.param({"layers": "concat-last-four"}, "tiny_four_layer_checkpoint", id="concat-last-four"),
    pytest.param({"token_embeddings": True}, "tiny_base_checkpoint", id="token-embeddings"),
    pytest.param(
        {"token_embeddings": True, "layers": "concat-last-four", "pooling": "cls", "normalize": True},
        "tiny_four_layer_checkpoint",
        id="token-embeddings-concat-cls-normalize",
    ),
]


@pytest.mark.parametrize(("options", "checkpoint_fixture"), EMBED_OPTIONS)
def test_embed_options_match_pytorch(
    options: dict[str, Any], checkpoint_fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    checkpoint: Path = request.getfixturevalue(checkpoint_fixture)
    result = export(tmp_path, checkpoint, "embed", **options)
    settings = {"pooling": "mean", "normalize": False, "layers": "last", "token_embeddings": False, **options}
    width = HIDDEN_SIZE * (4 if settings["layers"] == "concat-last-four" else 1)

    assert result.report.passed, result.report.problems
    manifest = read_manifest(result.directory)
    assert (manifest.pooling, manifest.normalize, manifest.layers, manifest.token_embeddings) == (
        settings["pooling"],
        settings["normalize"],
        settings["layers"],
        settings["token_embeddings"],
    )
    assert manifest.embedding_dim == width
    assert manifest.outputs == (("embedding", "token_embeddings") if settings["token_embeddings"] else ("embedding",))
    _, output_dims = graph_dims(result.directory / MODEL_FILE)
    assert isinstance(output_dims["embedding"][0], str), "the batch axis is dynamic"
    if settings["token_embeddings"]:
        assert all(isinstance(d, str) for d in output_dims["token_embeddings"][:2]), "batch and sequence are dynamic"

    inputs = encode_padded(result.directory, TEXTS)
    got = run_onnx(result, inputs)
    expected, hidden = reference_embedding(
        checkpoint, inputs, settings["pooling"], settings["normalize"], settings["layers"]
    )
    assert got["embedding"].shape == (len(TEXTS), width)
    np.testing.assert_allclose(got["embedding"], expected, atol=1e-5, rtol=1e-4)
    if settings["normalize"]:
        np.testing.assert_allclose(np.linalg.norm(got["embedding"], axis=-1), 1.0, atol=1e-5)
    if settings["token_embeddings"]:
        valid = inputs["attention_mask"].astype(bool)
        assert got["token_embeddings"].shape == (*inputs["input_ids"].shape, width)
        np.testing.assert_allclose(got["token_embeddings"][valid], hidden[valid], atol=1e-5, rtol=1e-4)


def test_normalize_changes_the_vectors(tiny_embed_export: ExportResult) -> None:
    # Guards the normalize case above: the default export's vectors are not unit vectors already.
    inputs = encode_padded(tiny_embed_export.directory, TEXTS)
    norms = np.linalg.norm(run_onnx(tiny_embed_export, inputs)["embedding"], axis=-1)
    assert not np.allclose(norms, 1.0, atol=1e-2)
