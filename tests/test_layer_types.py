"""Qwen2 configs whose layers differ in their attention window load as per-layer windows and
reproduce transformers (tolerances from the fixtures' README). Two checkpoints:

* `tiny-qwen2-layer-types`: a `layer_types` list, with a `max_window_layers` that disagrees with it
  (transformers lets `layer_types` win);
* `tiny-qwen2-max-window`: `use_sliding_window` and `max_window_layers` and no `layer_types` (older
  hub configs): layers from `max_window_layers` on use the window.

Both have `sliding_window = 5` and T = 24, so the window truncates attention in every sliding layer.
"""

import json
import shutil

import numpy as np
import pytest

import metalcandle as mc
from conftest import ATOL_FORWARD, LAYERED_MODELS, assert_cached_steps_match

S, F = "sliding_attention", "full_attention"
WINDOW = 5
# The layer types transformers derives from each config.json (golden.json records what it used).
EXPECTED = {
    "tiny-qwen2-layer-types": [S, F, S, S],  # max_window_layers = 3 alone would give [F, F, F, S]
    "tiny-qwen2-max-window": [F, S, S],
}
# Switching any one layer's window moves transformers' logits by at least 0.71 on these inputs
# (golden.json), so a loader that gets a single layer wrong is far outside ATOL_FORWARD.
MIN_WINDOW_EFFECT = 0.1


def windows(types: list[str]) -> list[int | None]:
    return [WINDOW if t == S else None for t in types]


def loaded_windows(model) -> list[int | None]:
    return [layer["attention"]["sliding_window"] for layer in model.spec["layers"]]


@pytest.fixture(scope="module", params=LAYERED_MODELS)
def case(request, fixtures):
    folder = fixtures / request.param
    return request.param, mc.load_model(folder), np.load(folder / "golden.npz")


def test_the_configs_say_what_the_fixtures_claim(fixtures):
    with_types = json.loads((fixtures / "tiny-qwen2-layer-types" / "config.json").read_text())
    assert with_types["layer_types"] == EXPECTED["tiny-qwen2-layer-types"]
    assert with_types["max_window_layers"] == 3
    without = json.loads((fixtures / "tiny-qwen2-max-window" / "config.json").read_text())
    assert "layer_types" not in without and without["max_window_layers"] == 1
    for cfg in (with_types, without):
        assert cfg["model_type"] == "qwen2" and cfg["use_sliding_window"] is True
        assert cfg["sliding_window"] == WINDOW


def test_per_layer_windows_are_the_ones_transformers_used(case, fixtures):
    name, model, _ = case
    used = json.loads((fixtures / name / "golden.json").read_text())["attention_windows"]
    assert used["layer_types_used_by_transformers"] == EXPECTED[name]
    assert loaded_windows(model) == windows(EXPECTED[name])
    # transformers' own attention weights: a sliding layer's query i sees min(i + 1, 5) keys.
    for (key, seen), w in zip(used["visible_keys_per_query"].items(), windows(EXPECTED[name]), strict=True):
        assert seen == [min(i + 1, w or i + 1) for i in range(len(seen))], key


def test_logits_and_hidden_states(case):
    _, model, g = case
    logits, hidden = model.forward(g["input_ids"], output_hidden_states=True)
    np.testing.assert_allclose(logits, g["logits"], atol=ATOL_FORWARD, rtol=0)
    np.testing.assert_allclose(hidden, g["hidden_states"], atol=ATOL_FORWARD, rtol=0)


def test_left_padded_batch_at_unmasked_positions(case):
    _, model, g = case
    logits = model.forward(
        g["pad_input_ids"], attention_mask=g["pad_attention_mask"], position_ids=g["pad_position_ids"]
    )
    keep = g["pad_attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[keep], g["pad_logits"][keep], atol=ATOL_FORWARD, rtol=0)


def test_kv_cache_step_logits_and_greedy_generation(case):
    _, model, g = case
    assert_cached_steps_match(model, g)
    np.testing.assert_array_equal(model.generate(g["gen_prompt"], max_new_tokens=16), g["gen_output"])


def edited(fixtures, tmp_path, name: str, **changes):
    """The fixture's weights under an edited config.json (a value of None deletes the key)."""
    folder = tmp_path / name
    shutil.copytree(fixtures / name, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return mc.load_model(folder)


def flip(types: list[str], layer: int) -> list[str]:
    return [(F if t == S else S) if i == layer else t for i, t in enumerate(types)]


@pytest.mark.parametrize("name", LAYERED_MODELS)
def test_each_layers_window_matters(fixtures, tmp_path, name):
    """A loader that got any one layer's window wrong would miss the recorded logits by more than
    MIN_WINDOW_EFFECT; with that layer switched, we match transformers' own switched run."""
    g = np.load(fixtures / name / "golden.npz")
    used = json.loads((fixtures / name / "golden.json").read_text())["attention_windows"]
    recorded = used["logits_max_abs_change_when_one_layer_is_switched"]
    for k in range(len(EXPECTED[name])):
        types = flip(EXPECTED[name], k)
        model = edited(fixtures, tmp_path / str(k), name, layer_types=types)
        assert loaded_windows(model) == windows(types)
        change = float(np.abs(model.forward(g["input_ids"]) - g["logits"]).max())
        assert change > MIN_WINDOW_EFFECT, (k, change)
        assert abs(change - recorded[f"layer {k} -> {types[k]}"]) <= ATOL_FORWARD, (k, change)
    full = edited(fixtures, tmp_path / "full", name, use_sliding_window=False)
    assert loaded_windows(full) == [None] * len(EXPECTED[name])
    change = float(np.abs(full.forward(g["input_ids"]) - g["logits"]).max())
    assert abs(change - used["logits_max_abs_change_with_every_layer_full"]) <= ATOL_FORWARD


@pytest.mark.parametrize(
    "max_window_layers, types",
    [(0, [S, S, S]), (1, [F, S, S]), (2, [F, F, S]), (3, [F, F, F]), (7, [F, F, F])],
)
def test_max_window_layers_picks_the_sliding_layers(fixtures, tmp_path, max_window_layers, types):
    model = edited(fixtures, tmp_path, "tiny-qwen2-max-window", max_window_layers=max_window_layers)
    assert loaded_windows(model) == windows(types)


def test_layer_types_win_over_max_window_layers(fixtures, tmp_path):
    # The same windows spelled as a layer_types list, next to a max_window_layers that says otherwise.
    g = np.load(fixtures / "tiny-qwen2-max-window" / "golden.npz")
    model = edited(
        fixtures,
        tmp_path,
        "tiny-qwen2-max-window",
        layer_types=EXPECTED["tiny-qwen2-max-window"],
        max_window_layers=3,
    )
    assert loaded_windows(model) == windows(EXPECTED["tiny-qwen2-max-window"])
    np.testing.assert_allclose(model.forward(g["input_ids"]), g["logits"], atol=ATOL_FORWARD, rtol=0)
