"""`next_token_probs` reproduces transformers' logits processors (fixtures) and their closed forms."""

import numpy as np
import pytest

import metalcandle as mc
from conftest import MODELS

# generation.npz warper names and the options that produced them (fixtures' README).
WARPS = {
    "t0.7": {"temperature": 0.7},
    "k5": {"top_k": 5},
    "p0.9": {"top_p": 0.9},
    "t1.3_k20_p0.8": {"temperature": 1.3, "top_k": 20, "top_p": 0.8},
    "minp0.1": {"min_p": 0.1},
    "rep1.5_t0.8_k10": {"repetition_penalty": 1.5, "temperature": 0.8, "top_k": 10},
}
ATOL_WARP = 1e-5


def softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="module", params=MODELS)
def warp(request, fixtures):
    return np.load(fixtures / request.param / "generation.npz")


@pytest.mark.parametrize("name", list(WARPS))
def test_matches_transformers_warpers(warp, name):
    probs = mc.next_token_probs(warp["warp_raw"], warp["warp_history"], **WARPS[name])
    ref = warp[f"warp_{name}_probs"]
    assert probs.shape == ref.shape and probs.dtype == np.float32
    np.testing.assert_array_equal(probs == 0, ref == 0)
    np.testing.assert_allclose(probs, ref, atol=ATOL_WARP, rtol=0)


def test_one_dimensional_logits_and_batches_agree(warp):
    raw, hist = warp["warp_raw"], warp["warp_history"]
    opts = WARPS["rep1.5_t0.8_k10"]
    single = mc.next_token_probs(raw[0], hist[0], **opts)
    batch = mc.next_token_probs(np.concatenate([raw, raw[:, ::-1]]), np.concatenate([hist, hist]), **opts)
    assert single.shape == (raw.shape[1],)
    np.testing.assert_array_equal(batch[0], single)
    np.testing.assert_array_equal(batch[1], mc.next_token_probs(raw[0, ::-1], hist[0], **opts))


def test_no_options_is_plain_softmax():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    np.testing.assert_allclose(mc.next_token_probs(logits, None), softmax64(logits), atol=1e-7)


def test_temperature_closed_form():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32) * 3
    for t in (0.3, 1.0, 2.5):
        np.testing.assert_allclose(
            mc.next_token_probs(logits, None, temperature=t), softmax64(logits / t), atol=1e-6
        )


def test_temperature_zero_is_greedy():
    logits = np.array([0.1, 2.0, 2.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(mc.next_token_probs(logits, None, temperature=0), [0, 1, 0, 0])


def test_repetition_penalty_closed_form():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    history = [0, 1, 1, 4]  # a repeated id is penalised once
    expected = softmax64([2.0 / 1.5, -2.0 * 1.5, 1.0, -1.0, 0.5 / 1.5])
    np.testing.assert_allclose(
        mc.next_token_probs(logits, history, repetition_penalty=1.5), expected, atol=1e-7
    )


def test_top_k_keeps_ties_with_the_kth_value():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    probs = mc.next_token_probs(logits, None, top_k=2)
    # The 2nd largest value (2.0) is shared by two ids: HF removes only scores strictly below it.
    np.testing.assert_array_equal(probs > 0, [True, False, True, True, False])
    np.testing.assert_allclose(probs[[0, 2, 3]], softmax64([3.0, 2.0, 2.0]), atol=1e-7)
    assert (mc.next_token_probs(logits, None, top_k=100) > 0).all()
    np.testing.assert_array_equal(
        mc.next_token_probs(logits, None, top_k=0), mc.next_token_probs(logits, None)
    )


def brute_force_top_p(probs, top_p):
    """The smallest set of most likely ids whose total probability reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(probs.shape, dtype=bool)
    total = 0.0
    for i in order:
        keep[i] = True
        total += probs[i]
        if total >= top_p:
            break
    return keep


def test_top_p_against_brute_force():
    rng = np.random.default_rng(2)
    checked = 0
    while checked < 50:
        logits = (rng.normal(size=40) * 2).astype(np.float32)
        top_p = float(rng.uniform(0.05, 0.99))
        p = softmax64(logits)
        cumulative = np.cumsum(np.sort(p)[::-1])
        if np.abs(cumulative - top_p).min() < 1e-5:
            continue  # a float32 tie with the threshold: the brute force cannot arbitrate it
        keep = brute_force_top_p(p, top_p)
        probs = mc.next_token_probs(logits, None, top_p=top_p)
        np.testing.assert_array_equal(probs > 0, keep)
        np.testing.assert_allclose(probs[keep], p[keep] / p[keep].sum(), atol=1e-6)
        checked += 1


def test_top_p_always_keeps_the_most_likely_id():
    logits = np.array([0.0, 5.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(mc.next_token_probs(logits, None, top_p=1e-9), [0, 1, 0])


def test_min_p_closed_form():
    logits = np.log(np.array([0.5, 0.2, 0.04, 0.26], dtype=np.float32))
    probs = mc.next_token_probs(logits, None, min_p=0.1)  # threshold 0.1 * 0.5 = 0.05
    np.testing.assert_array_equal(probs > 0, [True, True, False, True])
    np.testing.assert_allclose(probs, np.array([0.5, 0.2, 0.0, 0.26]) / 0.96, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        mc.next_token_probs(np.zeros(8, dtype=np.float32), [1, 2], **options)


def test_repetition_penalty_needs_history():
    with pytest.raises(ValueError, match="input_ids"):
        mc.next_token_probs(np.zeros(8, dtype=np.float32), None, repetition_penalty=1.2)
