"""Each ArchitectureSpec against the real transformers classes of its model_type:
the attributes and state-dict prefixes it names must exist and wire up as the heads assume."""

from __future__ import annotations

from pathlib import Path

import pytest

from family_checkpoints import FAMILIES, save_family_checkpoint

from exporter.architectures import ARCHITECTURES, architecture_for
from exporter.errors import SourceError
from exporter.source import load_model, resolve_source

# Every architecture with a test below; tests/exporter/test_tasks.py fails if a registered one is missing.
TESTED_ARCHITECTURES = tuple(FAMILIES)
TINY_CHECKPOINTS = {
    "bert": {"embed": "tiny_base_checkpoint", "fill-mask": "tiny_mlm_checkpoint", "classify": "tiny_classifier_checkpoint"},
}


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_spec_matches_the_transformers_models(
    model_type: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch

    spec = ARCHITECTURES[model_type]
    assert spec.model_type == model_type
    loaded = {}
    for task in ("embed", "fill-mask", "classify"):
        if model_type in TINY_CHECKPOINTS:
            checkpoint = request.getfixturevalue(TINY_CHECKPOINTS[model_type][task])
        else:
            checkpoint = save_family_checkpoint(tmp_path_factory.mktemp(f"{model_type}-{task}"), model_type, task)
        model, architecture = load_model(resolve_source(str(checkpoint)), task)  # type: ignore[arg-type]
        assert model.config.model_type == model_type
        assert architecture is spec
        assert not model.training
        loaded[task] = model

    masked_lm, classifier, base = loaded["fill-mask"], loaded["classify"], loaded["embed"]
    masked_lm_keys, classifier_keys = masked_lm.state_dict().keys(), classifier.state_dict().keys()
    assert any(key.startswith(spec.masked_lm_head_prefix) for key in masked_lm_keys)
    assert any(key.startswith(spec.classifier_head_prefix) for key in classifier_keys)
    assert not any(key.startswith(spec.masked_lm_head_prefix) for key in base.state_dict())
    if spec.pooler_prefix is not None:
        assert any(key.startswith(spec.pooler_prefix) for key in base.state_dict())

    # FillMaskHead runs the encoder attribute, then the head attribute on its last hidden state.
    encoder = getattr(masked_lm, spec.encoder_attribute)
    lm_head = spec.masked_lm_head(masked_lm)
    if len(spec.masked_lm_head_attributes) == 1 and spec.masked_lm_head_builder is None:
        assert lm_head is getattr(masked_lm, spec.masked_lm_head_attribute)
    assert isinstance(getattr(classifier, spec.encoder_attribute), type(encoder))
    input_ids = torch.tensor([[101, 1045, 2293, 103, 102]]) if model_type == "bert" else torch.tensor([[0, 45, 93, 4, 2]])
    with torch.no_grad():
        through_attributes = lm_head(encoder(input_ids=input_ids).last_hidden_state)
        whole_model = masked_lm(input_ids=input_ids).logits
    torch.testing.assert_close(through_attributes, whole_model)


def test_an_unknown_model_type_names_the_supported_ones() -> None:
    supported = ", ".join(sorted(ARCHITECTURES))
    assert supported.startswith("bert, camembert, deberta-v2, distilbert, electra, modernbert, mpnet, roberta")
    with pytest.raises(SourceError, match=rf"some/model: model_type 'gpt2' is not supported; bertbatch exports {supported}$"):
        architecture_for("gpt2", "some/model")
