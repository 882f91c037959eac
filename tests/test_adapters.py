"""Architecture adapters: the interface, registration, validation."""

import json

import numpy as np
import pytest

import metalcandle as mc
from conftest import ATOL_FORWARD, MODELS
from metalcandle.adapters import (
    ADAPTERS,
    AdapterValidationError,
    BaseAdapter,
    CustomTransformerAdapter,
    QwenAdapter,
    adapter_for,
    get_adapter_class,
    load_adapter_model,
    register_adapter,
    validate_adapter,
)

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
            norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False, dropout=0.0)  # fmt: skip


def test_lookup_by_architecture_type_and_model_type():
    assert set(ADAPTERS) >= {"custom-transformer", "qwen", "llama", "mistral", "gpt2", "phi3"}
    assert get_adapter_class("qwen") is QwenAdapter
    assert get_adapter_class("qwen2") is QwenAdapter  # config.json's model_type
    with pytest.raises(KeyError, match="no adapter for architecture 'mamba'"):
        get_adapter_class("mamba")


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_adapters_pass_validation(fixtures, name):
    adapter = load_adapter_model(fixtures / name)
    report = validate_adapter(adapter)
    model = mc.load_model(fixtures / name)
    assert report["parameters"] == model.num_parameters()
    # forward gives transformers' logits, and the folder's tokenizer comes with it.
    golden = np.load(fixtures / name / "golden.npz")
    np.testing.assert_allclose(
        adapter.forward(golden["input_ids"]), golden["logits"], atol=ATOL_FORWARD, rtol=0
    )
    examples = json.loads((fixtures / "tokenizer" / "tokenizer_golden.json").read_text())["encode_examples"]
    tokenizer = adapter.get_tokenizer()
    assert [tokenizer.encode(e["text"]) for e in examples] == [e["ids"] for e in examples]
    assert (
        dict(adapter.parameters())[model.parameter_names()[0]].shape
        == model.get_parameter(model.parameter_names()[0]).shape
    )


def test_custom_transformer_adapter(tmp_path):
    adapter = CustomTransformerAdapter.from_config(TINY, seed=1)
    assert adapter.get_architecture_type() == "custom-transformer"
    assert adapter.get_config()["d_model"] == 32
    assert validate_adapter(adapter)["logits_shape"] == (2, 8, 50)
    assert adapter_for(adapter.model).__class__ is CustomTransformerAdapter


def test_wrong_architecture_is_refused(fixtures):
    with pytest.raises(ValueError, match="QwenAdapter handles qwen2 models, got 'llama'"):
        QwenAdapter.from_pretrained(fixtures / "tiny-llama")


def test_validation_catches_a_broken_adapter():
    @register_adapter("broken-test-arch")
    class Broken(BaseAdapter):
        def describe(self):
            return "broken"

        def forward(self, input_ids, attention_mask=None):
            return self.model.forward(input_ids)[:, :-1]  # drops a position

    try:
        inner = mc.Model.from_config({"model_type": "custom-transformer", **TINY})
        with pytest.raises(AdapterValidationError, match="forward\\(\\) gave shape"):
            validate_adapter(Broken(inner))

        class Unregistered(CustomTransformerAdapter):
            pass

        with pytest.raises(AdapterValidationError, match="not registered"):
            validate_adapter(Unregistered(inner))
    finally:
        ADAPTERS.pop("broken-test-arch")
