"""Every BERT-family architecture, every task: a tiny random checkpoint with the family's own kind
of tokenizer (tests/exporter/family_checkpoints.py), exported and validated, run through the
worker on Parquet, and compared with PyTorch computed here with transformers' Auto classes on
the same checkpoint, tokenized by the checkpoint's own transformers tokenizer, one row at a time.

The rows include one longer than the model's usable length, truncated to exactly that
length: RoBERTa-style models number positions from padding_idx + 1, and that row is where a
wrong position offset breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from family_checkpoints import FAMILIES, LABELS, save_family_checkpoint

from exporter.architectures import ARCHITECTURES
from exporter.export import ExportConfig, ExportResult, export_model
from worker.modeldir.manifest import TASKS
from worker.config import RunConfig
from worker.job import run_job

FAMILY_TASKS = [(family, task) for family in FAMILIES for task in TASKS]
# Every family has its attention fused by --optimize, or says why not (ArchitectureSpec.not_fusable).
FUSED_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")
LONG = " ".join(["the quick brown fox jumps over the lazy dog and i love kathmandu"] * 12)
TEXTS = ["i love kathmandu", "The quick brown fox jumps over the lazy dog.", "", LONG, "Zürich, Malmö and 東京", "A"]
PAIRS = ["Kathmandu is the capital of Nepal.", "No.", "a pair", "short", LONG, ""]


def test_every_registered_family_has_an_end_to_end_test() -> None:
    untested = set(ARCHITECTURES) - set(FAMILIES)
    assert not untested, f"architectures without a tiny checkpoint in family_checkpoints.py: {sorted(untested)}"
    assert {family for family, _ in FAMILY_TASKS} == set(ARCHITECTURES)
    assert set(FUSED_FAMILIES) == {name for name, spec in ARCHITECTURES.items() if spec.not_fusable is None}


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]


@pytest.fixture(scope="session")
def family_cache(tmp_path_factory: pytest.TempPathFactory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("families"))


def family_checkpoint(cache: _Cache, family: str, task: str) -> Path:
    directory = cache.root / f"{family}-{task}"
    return cache.get(("checkpoint", family, task), lambda: save_family_checkpoint(directory, family, task))  # type: ignore[no-any-return]


def family_export(cache: _Cache, family: str, task: str, **options: Any) -> ExportResult:
    checkpoint = family_checkpoint(cache, family, task)
    name = "-".join([family, task, *(f"{k}-{v}" for k, v in sorted(options.items()))])
    config = ExportConfig(source=str(checkpoint), task=task, out=cache.root / "exports" / name, **options)  # type: ignore[arg-type]
    return cache.get(("export", name), lambda: export_model(config, log=lambda line: None))  # type: ignore[no-any-return]


class AutoReference:
    """PyTorch outputs with transformers' Auto classes, one unpadded row at a time."""

    def __init__(self, checkpoint: Path, task: str) -> None:
        import transformers

        auto = {"embed": transformers.AutoModel, "fill-mask": transformers.AutoModelForMaskedLM,
                "classify": transformers.AutoModelForSequenceClassification,
                "token-classify": transformers.AutoModelForTokenClassification}[task]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.model = auto.from_pretrained(checkpoint).eval()

    def forward(self, text: str, pair: str | None, max_length: int) -> tuple[Any, Any]:
        import torch

        encoded = self.tokenizer([text], None if pair is None else [pair], truncation=True, max_length=max_length,
                                 return_tensors="pt")
        with torch.no_grad():
            return encoded, self.model(**encoded)


def run_worker(result: ExportResult, tmp_path: Path, texts: list[str], pairs: list[str] | None = None) -> pa.Table:
    columns = {"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())}
    if pairs is not None:
        columns["pair"] = pa.array(pairs, pa.string())
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table(columns), source, row_group_size=4)
    output = tmp_path / "out"
    run_job(RunConfig(model_dir=result.directory, input=str(source), output=output, text_column="text",
                      text_pair_column="pair" if pairs is not None else None, batch_size=4, max_tokens=512))
    return pq.read_table(output).sort_by("id")


def masked_texts(mask: str) -> list[str]:
    return [f"i love {mask}", f"the {mask} brown fox jumps over the {mask} dog", "no mask in this row", mask,
            f"{LONG} {mask}", f"{mask} {LONG}"]


def assert_embeddings(table: pa.Table, reference: AutoReference, max_length: int) -> None:
    for row, text in enumerate(TEXTS):
        encoded, output = reference.forward(text, None, max_length)
        expected = output.last_hidden_state[0].mean(dim=0).numpy()
        got = np.asarray(table["embedding"][row].as_py(), dtype=np.float64)
        cosine = got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))
        assert cosine >= 0.9999, f"row {row}: cosine {cosine}"
        assert np.abs(got - expected).max() <= 1e-4, f"row {row}"
    assert len(encoded["input_ids"][0]) <= max_length
    longest = reference.tokenizer([LONG], truncation=True, max_length=max_length)["input_ids"][0]
    assert len(longest) == max_length, "one row reaches the usable maximum length"


def assert_fills(table: pa.Table, reference: AutoReference, max_length: int, texts: list[str], top_k: int) -> None:
    import torch

    masks_seen = 0
    for row, text in enumerate(texts):
        encoded, output = reference.forward(text, None, max_length)
        ids = encoded["input_ids"][0]
        positions = torch.nonzero(ids == reference.tokenizer.mask_token_id).flatten().tolist()
        fills = table["fills"][row].as_py()
        assert len(fills) == len(positions), f"row {row}"
        for position, fill in zip(positions, fills):
            scores, top_ids = torch.topk(torch.softmax(output.logits[0, position], dim=-1), top_k)
            assert fill[0]["token_id"] == top_ids[0].item(), f"row {row}: top-1 fill"
            np.testing.assert_allclose([f["score"] for f in fill], scores.numpy(), atol=1e-4, err_msg=f"row {row}")
            masks_seen += 1
    assert masks_seen >= 5


def assert_probs(table: pa.Table, reference: AutoReference, max_length: int, pairs: list[str] | None) -> None:
    import torch

    for row, text in enumerate(TEXTS):
        _, output = reference.forward(text, None if pairs is None else pairs[row], max_length)
        expected = torch.softmax(output.logits[0], dim=-1).numpy()
        got = np.asarray(table["probs"][row].as_py())
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"row {row}")
        assert table["label"][row].as_py() == LABELS[int(expected.argmax())]


def assert_entities(table: pa.Table, checkpoint: Path, max_length: int) -> None:
    """Entities against transformers' own pipeline on the family's checkpoint and tokenizer (WordPiece,
    byte-level BPE, SentencePiece: the pipeline's word rule differs between them)."""
    from conftest import TokenPipelineReference

    reference = TokenPipelineReference(checkpoint)
    for row, text in enumerate(TEXTS):
        got = table["entities"][row].as_py()
        expected = reference.entities(text, max_length=max_length)
        assert [(e["label"], e["start"], e["end"]) for e in got] == [(e[0], e[2], e[3]) for e in expected], f"row {row}"
        np.testing.assert_allclose([e["score"] for e in got], [e[1] for e in expected], atol=1e-4, err_msg=f"row {row}")
        assert all(e["text"] == text[e["start"] : e["end"]] for e in got)


def assert_matches_pytorch(result: ExportResult, checkpoint: Path, task: str, tmp_path: Path) -> None:
    reference = AutoReference(checkpoint, task)
    max_length = result.manifest.max_length
    if task == "embed":
        assert_embeddings(run_worker(result, tmp_path, TEXTS), reference, max_length)
    elif task == "fill-mask":
        texts = masked_texts(reference.tokenizer.mask_token)
        assert_fills(run_worker(result, tmp_path, texts), reference, max_length, texts, result.manifest.top_k or 5)
    elif task == "token-classify":
        assert_entities(run_worker(result, tmp_path, TEXTS), checkpoint, max_length)
    else:
        assert_probs(run_worker(result, tmp_path / "single", TEXTS), reference, max_length, None)
        assert_probs(run_worker(result, tmp_path / "pairs", TEXTS, PAIRS), reference, max_length, PAIRS)


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
def test_family_exports_validate_and_the_worker_matches_pytorch(
    family: str, task: str, family_cache: _Cache, tmp_path: Path
) -> None:
    import transformers

    result = family_export(family_cache, family, task)
    checkpoint = family_checkpoint(family_cache, family, task)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    spec = ARCHITECTURES[family]

    assert result.report.passed
    assert {case["name"] for case in result.report.cases} >= {"near-max-length", "sentence-pairs", "batch-1"}
    graph = onnx.load(str(result.directory / result.manifest.model_file))
    graph_inputs = tuple(graph_input.name for graph_input in graph.graph.input)
    assert graph_inputs == result.manifest.inputs == spec.input_names(config)
    # The graph takes what the checkpoint's own tokenizer feeds the model.
    tokenizer_inputs = transformers.AutoTokenizer.from_pretrained(checkpoint).model_input_names
    assert ("token_type_ids" in graph_inputs) == ("token_type_ids" in tokenizer_inputs and spec.uses_token_type_ids(config))
    assert result.manifest.max_length == spec.max_length(config)
    if family in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        assert result.manifest.max_length == config.max_position_embeddings - config.pad_token_id - 1
    assert_matches_pytorch(result, checkpoint, task, tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimize_fuses_what_applies_and_still_matches_pytorch(family: str, family_cache: _Cache, tmp_path: Path) -> None:
    result = family_export(family_cache, family, "embed", optimize=True)
    optimization = result.manifest.optimization
    spec = ARCHITECTURES[family]

    assert optimization["family"] == family
    assert optimization["fused"]["SkipLayerNormalization"] >= 4
    attention = optimization["fused"]["Attention"]
    if spec.not_fusable is None:
        assert attention == 2 and optimization["attention"] == "fused in every layer"
    else:
        assert attention == 0 and optimization["attention"] == f"not fused: {spec.not_fusable}"
    assert_matches_pytorch(result, family_checkpoint(family_cache, family, "embed"), "embed", tmp_path)


# The fused families with EmbedLayerNormalization (BERT's own graph is covered by test_packing_reference.py).
# RoBERTa-style graphs pack too (their conversion is checked in the test below), but onnx's ReferenceEvaluator
# cannot run their embeddings (GatherElements over the buffered token types), so their packed numbers
# are not checked on a CPU.
PACKABLE_FAMILIES = ("distilbert", "electra")


@pytest.mark.parametrize("family", ("roberta", "xlm-roberta", "camembert"))
def test_packed_conversion_of_roberta_style_graphs_covers_the_encoder(family: str, family_cache: _Cache, tmp_path: Path) -> None:
    import shutil

    from exporter.packing import convert_to_packed_attention

    result = family_export(family_cache, family, "embed", optimize=True)
    packed = tmp_path / "packed.onnx"
    shutil.copyfile(result.directory / result.manifest.model_file, packed)
    # check_packed_graph inside: padding removed once, every attention packed, no head reads packed tokens.
    assert convert_to_packed_attention(packed, 2)["operators"] == {"RemovePadding": 1, "PackedAttention": 2, "RestorePadding": 1}


@pytest.mark.parametrize("family", PACKABLE_FAMILIES)
def test_packed_conversion_of_a_fused_family_keeps_the_numbers_on_the_cpu_reference(
    family: str, family_cache: _Cache, tmp_path: Path
) -> None:
    """--packed exports on CUDA only; here the packing rewrite of each fused family's graph is checked on CPU:
    the packed graph in numpy reference operators gives what onnxruntime gives for the fused graph."""
    import shutil

    from contrib_reference import evaluate, reference_evaluator
    from test_packing_reference import assert_outputs_match, onnxruntime_cpu, perturb_weights, worker_batches

    from exporter.packing import convert_to_packed_attention

    result = family_export(family_cache, family, "embed", optimize=True)
    fused, packed = tmp_path / "fused.onnx", tmp_path / "packed.onnx"
    perturb_weights(result.directory / result.manifest.model_file, fused)
    shutil.copyfile(fused, packed)
    counts = convert_to_packed_attention(packed, 2)["operators"]
    assert counts == {"RemovePadding": 1, "PackedAttention": 2, "RestorePadding": 1}

    feeds = [{name: feed[name] for name in result.manifest.inputs} for feed in worker_batches(result.directory)]
    names, expected = onnxruntime_cpu(fused, feeds)
    evaluator = reference_evaluator(packed)
    for feed, wanted in zip(feeds, expected):
        assert_outputs_match(names, evaluate(evaluator, feed), wanted, 1e-4, f"{family} {feed['input_ids'].shape}")


@pytest.mark.parametrize("family", sorted(name for name, spec in ARCHITECTURES.items() if spec.not_fusable))
def test_packed_is_refused_for_a_family_whose_attention_does_not_fuse(family: str, family_cache: _Cache) -> None:
    from exporter.errors import ExportError

    checkpoint = family_checkpoint(family_cache, family, "embed")
    out = family_cache.root / "refused" / family
    with pytest.raises(ExportError, match=rf"--packed: {family} cannot be packed: its attention does not fuse \("):
        export_model(ExportConfig(source=str(checkpoint), task="embed", out=out, packed=True), log=lambda line: None)
    assert not out.exists()


# Fused and unfused attention, both reduced precisions (README's table has every family, measured the same way).
REDUCED_PRECISION = [("roberta", "fp16"), ("xlm-roberta", "int8"), ("distilbert", "int8"), ("electra", "fp16"),
                     ("mpnet", "fp16"), ("deberta-v2", "int8"), ("modernbert", "fp16"), ("modernbert", "int8")]


@pytest.mark.parametrize(("family", "precision"), REDUCED_PRECISION)
def test_reduced_precision_variants_export_and_validate(family: str, precision: str, family_cache: _Cache) -> None:
    options: dict[str, Any] = {"fp16": True} if precision == "fp16" else {"quantize": "int8"}
    result = family_export(family_cache, family, "embed", **options)
    assert result.report.passed and result.manifest.precision == precision
    stats = result.report.outputs["embedding"]
    assert stats.min_cosine is not None and stats.min_cosine >= (0.999 if precision == "fp16" else 0.9)
    record = result.manifest.optimization
    assert ("float16" if precision == "fp16" else "quantization") in record
    assert record["attention"] == ("fused in every layer" if family in FUSED_FAMILIES else f"not fused: {ARCHITECTURES[family].not_fusable}")


def test_a_pooler_with_random_weights_is_refused(family_cache: _Cache) -> None:
    """AutoModel on a masked-LM checkpoint (roberta-base ships as one) initialises the pooler randomly."""
    from exporter.errors import ExportError

    checkpoint = family_checkpoint(family_cache, "roberta", "fill-mask")
    with pytest.raises(ExportError, match="--pooling pooler: this checkpoint has no pooler layer; use mean or cls"):
        export_model(ExportConfig(source=str(checkpoint), task="embed", out=family_cache.root / "no-pooler", pooling="pooler"),
                     log=lambda line: None)
    pooled = family_export(family_cache, "roberta", "embed", pooling="pooler")  # a base checkpoint has its pooler
    assert pooled.report.passed and pooled.manifest.pooling == "pooler"
