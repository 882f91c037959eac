"""The decoder reproduces transformers on every fixture checkpoint (tolerances from the fixtures' README)."""

import numpy as np
import pytest

import metalcandle as mc
from conftest import ATOL_FORWARD, MODELS, assert_cached_steps_match


@pytest.fixture(scope="module", params=MODELS)
def case(request, fixtures):
    folder = fixtures / request.param
    return mc.load_model(folder), np.load(folder / "golden.npz")


def test_logits_and_hidden_states(case):
    model, g = case
    logits, hidden = model.forward(g["input_ids"], output_hidden_states=True)
    assert logits.shape == g["logits"].shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, g["logits"], atol=ATOL_FORWARD, rtol=0)
    assert hidden.shape == g["hidden_states"].shape
    np.testing.assert_allclose(hidden, g["hidden_states"], atol=ATOL_FORWARD, rtol=0)


def test_last_layer_output_before_the_final_norm(case):
    model, g = case
    point = f"layers.{model.num_layers - 1}.residual"
    with model.capture(point) as cap:
        model.forward(g["input_ids"])
    np.testing.assert_allclose(cap[point], g["final_layer_prenorm"], atol=ATOL_FORWARD, rtol=0)


def test_left_padded_batch_at_unmasked_positions(case):
    model, g = case
    logits = model.forward(
        g["pad_input_ids"], attention_mask=g["pad_attention_mask"], position_ids=g["pad_position_ids"]
    )
    keep = g["pad_attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[keep], g["pad_logits"][keep], atol=ATOL_FORWARD, rtol=0)


def test_greedy_generation_token_for_token(case):
    model, g = case
    out = model.generate(g["gen_prompt"], max_new_tokens=16)
    np.testing.assert_array_equal(out, g["gen_output"])


def test_kv_cache_step_logits(case):
    model, g = case
    cache = assert_cached_steps_match(model, g)
    assert cache.seq_len == g["gen_output"].shape[1] - 1


# Unique parameters (tied weights counted once), from the fixtures' README.
@pytest.mark.parametrize(
    "name, architecture, parameters",
    [
        ("tiny-qwen2", "qwen2", 112_192),
        ("tiny-llama", "llama", 151_872),
        ("tiny-gpt2", "gpt2", 133_888),
        ("tiny-mistral-sw", "mistral", 137_536),
        ("tiny-phi3", "phi3", 125_248),
    ],
)
def test_architecture_and_parameter_count(fixtures, name, architecture, parameters):
    model = mc.load_model(fixtures / name)
    assert model.architecture == architecture and model.config["model_type"] == architecture
    assert model.num_parameters() == parameters
