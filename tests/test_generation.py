"""Generation against transformers (golden.npz, generation.npz), a brute-force beam reference, sampling
statistics, streaming and bad input."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

import metalcandle as mc
from conftest import MODELS, ScriptedModel
from metalcandle.generate import beam_search, generate, plan_generation, resolve_eos, sample_rows

ATOL_BEAM_SCORE = 1e-4  # fixtures' README
NO_EOS = []  # the fixtures were generated with eos_token_id=None: never stop early


@pytest.fixture(scope="module", params=MODELS)
def case(request, fixtures):
    folder = fixtures / request.param
    return mc.load_model(folder), np.load(folder / "golden.npz"), np.load(folder / "generation.npz")


@pytest.fixture(scope="module")
def qwen(fixtures):
    folder = fixtures / "tiny-qwen2"
    return mc.load_model(folder), mc.load_tokenizer(folder), np.load(folder / "golden.npz")


# --- transformers parity ---------------------------------------------------------------------------------


def test_greedy_matches_transformers(case):
    model, golden, _ = case
    out = generate(model, golden["gen_prompt"], max_new_tokens=16, eos_token_id=NO_EOS)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, golden["gen_output"])


def test_greedy_repetition_penalty_matches_transformers(case):
    model, golden, gen = case
    out = model.generate(golden["gen_prompt"], max_new_tokens=16, repetition_penalty=1.3, eos_token_id=NO_EOS)
    np.testing.assert_array_equal(out, gen["greedy_rep1.3"])


def test_beam3_matches_transformers(case):
    model, golden, gen = case
    plan = plan_generation(model, golden["gen_prompt"], max_new_tokens=12, eos_token_id=NO_EOS)
    sequences, scores = beam_search(model, plan, num_beams=3)
    np.testing.assert_array_equal(sequences, gen["beam3"])
    np.testing.assert_allclose(scores, gen["beam3_scores"], atol=ATOL_BEAM_SCORE, rtol=0)


def test_beam4_two_sequences_length_penalty_matches_transformers(case):
    model, golden, gen = case
    plan = plan_generation(model, golden["gen_prompt"], max_new_tokens=12, eos_token_id=NO_EOS)
    sequences, scores = beam_search(model, plan, num_beams=4, num_return_sequences=2, length_penalty=0.6)
    np.testing.assert_array_equal(sequences, gen["beam4"])
    np.testing.assert_allclose(scores, gen["beam4_scores"], atol=ATOL_BEAM_SCORE, rtol=0)
    public = model.generate(
        golden["gen_prompt"],
        max_new_tokens=12,
        num_beams=4,
        num_return_sequences=2,
        length_penalty=0.6,
        eos_token_id=NO_EOS,
    )
    np.testing.assert_array_equal(public, gen["beam4"])


# --- batching, eos, context ------------------------------------------------------------------------------


def test_left_padded_batch_equals_single_prompts(qwen):
    model, _, golden = qwen
    prompts = [golden["gen_prompt"][0].tolist(), golden["gen_prompt"][0, 3:].tolist(), [5, 9]]
    for options in ({}, {"num_beams": 3}, {"num_beams": 2, "length_penalty": 0.6}):
        batch = model.generate(prompts, max_new_tokens=10, eos_token_id=NO_EOS, pad_token_id=381, **options)
        assert batch.shape == (3, 8 + 10)
        for row, prompt in zip(batch, prompts, strict=True):
            single = model.generate([prompt], max_new_tokens=10, eos_token_id=NO_EOS, **options)[0]
            np.testing.assert_array_equal(row[: 8 - len(prompt)], 381)
            np.testing.assert_array_equal(row[8 - len(prompt) :], single)


def test_explicit_attention_mask_is_validated(qwen):
    model, _, golden = qwen
    ids = golden["gen_prompt"]
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=np.array([[1, 1, 1, 1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        model.generate(ids, attention_mask=np.zeros_like(ids))


def test_eos_stops_rows_and_pads_them(qwen):
    model, _, golden = qwen
    full = golden["gen_output"][0]
    # The first greedy token that did not occur before it among the new tokens becomes the eos id.
    k = next(k for k in range(1, 16) if full[8 + k] not in full[8 : 8 + k])
    eos = int(full[8 + k])
    out = model.generate(golden["gen_prompt"], max_new_tokens=16, eos_token_id=eos)
    np.testing.assert_array_equal(out[0], full[: 8 + k + 1])
    batch = model.generate(
        [full[:8].tolist(), [3, 4, 5]], max_new_tokens=16, eos_token_id=eos, pad_token_id=0
    )
    np.testing.assert_array_equal(batch[0, : 8 + k + 1], full[: 8 + k + 1])
    assert batch.shape[1] > 8 + k + 1 and (batch[0, 8 + k + 1 :] == 0).all()  # padded while row 1 goes on


def test_default_eos_comes_from_the_model_config(qwen):
    model, _, _ = qwen
    assert resolve_eos(model) == [383]
    assert resolve_eos(model, eos_token_id=[]) == []


def test_generation_stops_at_the_context_limit(fixtures):
    model = mc.load_model(fixtures / "tiny-gpt2")  # n_positions 128
    prompt = np.arange(120, dtype=np.int64)[None] % 300
    with pytest.warns(UserWarning, match="context"):
        out = model.generate(prompt, max_new_tokens=16, eos_token_id=NO_EOS)
    assert out.shape == (1, 128)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt_ids": np.zeros((1, 0), dtype=np.int64)}, "empty"),
        ({"prompt_ids": np.zeros((1, 513), dtype=np.int64)}, "context"),
        ({"top_p": 0.0, "do_sample": True}, "top_p"),
        ({"top_p": 1.01, "do_sample": True}, "top_p"),
        ({"temperature": -1.0, "do_sample": True}, "temperature"),
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"early_stopping": "sometimes", "num_beams": 2}, "early_stopping"),
        ({"stop_strings": ["x"]}, "tokenizer"),
    ],
)
def test_bad_input_raises_value_error(qwen, options, message):
    model, _, golden = qwen
    options = {"prompt_ids": golden["gen_prompt"], **options}
    with pytest.raises(ValueError, match=message):
        model.generate(**options)


# --- beam search with eos against exhaustive search ------------------------------------------------------


def exhaustive_hypotheses(model, prompt, max_new, eos, length_penalty):
    """Every continuation of at most `max_new` tokens (eos only last), scored as HF scores finished
    beams: sum of log-probs / generated length ** length_penalty; best first."""
    results = []
    frontier = {(): 0.0}  # open continuation -> sum of its log-probs
    for length in range(1, max_new + 1):
        grown = {}
        for seq, total in frontier.items():
            logits = model.forward(np.array([prompt + list(seq)]))[0, -1].astype(np.float64)
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            for token, lp in enumerate(logp):
                if token == eos or length == max_new:
                    results.append(((total + lp) / length**length_penalty, [*seq, token]))
                if token != eos:
                    grown[(*seq, token)] = total + lp
        frontier = grown
    return sorted(results, key=lambda r: -r[0])


def tiny_model(vocab, seed):
    """A random one-layer model small enough to enumerate every continuation; eos is the last id."""
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": vocab,
        "eos_token_id": vocab - 1,
    }
    return mc.Model.from_config(config, seed=seed), vocab - 1


@pytest.mark.parametrize("length_penalty", [1.0, 0.6, 0.0])
def test_beam_search_with_eos_finds_the_exhaustive_optimum(length_penalty):
    # With as many beams as live candidates, beam search prunes nothing that could win, so HF's
    # bookkeeping (finished hypotheses, eos appended, scores) must reproduce the exhaustive ranking.
    model, eos = tiny_model(6, seed=0)
    prompt = [1, 2]
    expected = exhaustive_hypotheses(model, prompt, 3, eos, length_penalty)
    assert any(seq[-1] == eos for _, seq in expected[:3])  # finished hypotheses compete for the top
    assert min(a[0] - b[0] for a, b in itertools.pairwise(expected[:4])) > 1e-4  # no near-ties to flip
    plan = plan_generation(model, [prompt], max_new_tokens=3)
    sequences, scores = beam_search(
        model,
        plan,
        num_beams=36,
        num_return_sequences=3,
        length_penalty=length_penalty,
        early_stopping="never",
    )
    for row, score, (ref_score, ref_seq) in zip(sequences, scores, expected[:3], strict=True):
        np.testing.assert_array_equal(row[: 2 + len(ref_seq)], prompt + ref_seq)
        assert score == pytest.approx(ref_score, abs=ATOL_BEAM_SCORE)


# Two models where one mode's earlier stop changes the result: True against False, False against "never".
@pytest.mark.parametrize("vocab, seed, earlier, later", [(8, 8, 0, 1), (6, 19, 1, 2)])
def test_beam_early_stopping_modes_only_decide_when_to_stop(vocab, seed, earlier, later):
    # The modes share the beams until they stop (True: once num_beams hypotheses are finished; False:
    # once no running beam can beat the worst of them; "never": at max_new_tokens), and finished
    # hypotheses only accumulate. So a later stop ranks at least as well, place by place, and every
    # score is its sequence's own length-normalised log-probability.
    model, eos = tiny_model(vocab, seed)
    prompt, max_new = [1, 2], 3
    exact = {tuple(seq): score for score, seq in exhaustive_hypotheses(model, prompt, max_new, eos, 1.0)}
    ranked = []
    for mode in (True, False, "never"):
        plan = plan_generation(model, [prompt], max_new_tokens=max_new)
        sequences, scores = beam_search(model, plan, num_beams=2, num_return_sequences=2, early_stopping=mode)
        assert list(scores) == sorted(scores, reverse=True)
        for row, score in zip(sequences, scores, strict=True):
            new = row[len(prompt) :].tolist()
            hypothesis = tuple(new[: new.index(eos) + 1] if eos in new else new)  # eos pads finished rows
            assert score == pytest.approx(exact[hypothesis], abs=ATOL_BEAM_SCORE), (mode, hypothesis)
        ranked.append(scores)
    assert all((a <= b).all() for a, b in itertools.pairwise(ranked))
    assert (ranked[earlier] < ranked[later]).any()


# --- sampling ---------------------------------------------------------------------------------------------


def test_same_seed_same_tokens(qwen):
    model, _, golden = qwen
    opts = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "eos_token_id": NO_EOS}
    a = model.generate(golden["gen_prompt"], seed=7, **opts)
    b = model.generate(golden["gen_prompt"], seed=7, **opts)
    c = model.generate(golden["gen_prompt"], seed=8, **opts)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampled_first_tokens_follow_next_token_probs(qwen, fixtures):
    model, _, golden = qwen
    gen = np.load(fixtures / "tiny-qwen2" / "generation.npz")
    expected = gen["warp_t1.3_k20_p0.8_probs"][0].astype(np.float64)  # transformers' distribution
    draws = 4000
    out = model.generate(
        golden["gen_prompt"],
        max_new_tokens=1,
        do_sample=True,
        temperature=1.3,
        top_k=20,
        top_p=0.8,
        num_return_sequences=draws,
        seed=0,
    )
    counts = np.bincount(out[:, -1], minlength=expected.size)
    support = expected > 0
    assert counts[~support].sum() == 0  # removed ids are never drawn
    assert support.sum() == 16  # the critical value below is for 15 degrees of freedom
    chi2 = (((counts - draws * expected)[support]) ** 2 / (draws * expected[support])).sum()
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_sample_rows_never_draws_zero_probability_ids():
    rng = np.random.default_rng(0)
    probs = np.array([[0.0, 0.5, 0.0, 0.5, 0.0]] * 2000, dtype=np.float32)
    picks = sample_rows(probs, rng)
    assert set(np.unique(picks)) == {1, 3}
    assert abs((picks == 1).mean() - 0.5) < 0.05
    # A uniform draw that rounds up to the total mass still lands on an id with mass.
    assert sample_rows(probs[:1], SimpleNamespace(random=np.ones)).tolist() == [3]


# --- streaming and text ----------------------------------------------------------------------------------


def test_stream_never_splits_multibyte_characters(qwen):
    _, tok, _ = qwen
    text = "café 東京, emoji 🙂 naïve"
    script = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in script)  # single tokens are partial characters
    model = ScriptedModel(script, tok.vocab_size)
    pieces = list(mc.stream_text(model, tok, "x", max_new_tokens=len(script), eos_token_id=NO_EOS))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 5  # it streams, not one final piece
    assert mc.generate_text(model, tok, "x", max_new_tokens=len(script), eos_token_id=NO_EOS) == text


def test_stream_text_equals_decoded_generate(qwen):
    model, tok, _ = qwen
    prompt = "Return the number of items in the container."
    ids = model.generate([tok.encode(prompt)], max_new_tokens=20)
    expected = tok.decode(ids[0, len(tok.encode(prompt)) :], skip_special_tokens=True)
    pieces = list(mc.stream_text(model, tok, prompt, max_new_tokens=20))
    assert "".join(pieces) == expected
    assert mc.generate_text(model, tok, prompt, max_new_tokens=20) == expected
    beam = mc.generate_text(model, tok, prompt, max_new_tokens=8, num_beams=3)
    beam_ids = model.generate([tok.encode(prompt)], max_new_tokens=8, num_beams=3)
    assert beam == tok.decode(beam_ids[0, len(tok.encode(prompt)) :], skip_special_tokens=True)


def test_stop_strings_end_generation(qwen):
    model, tok, _ = qwen
    prompt = "Hello world! This is a test"
    full = mc.generate_text(model, tok, prompt, max_new_tokens=30, eos_token_id=NO_EOS)
    stop = next(
        full[i : i + 2]
        for i in range(1, len(full))
        if full[i : i + 2].isascii() and len(full[i : i + 2]) == 2
    )
    cut = full.index(stop)
    text = mc.generate_text(model, tok, prompt, max_new_tokens=30, eos_token_id=NO_EOS, stop_strings=[stop])
    assert text == full[: cut + len(stop)]
    without = mc.generate_text(
        model,
        tok,
        prompt,
        max_new_tokens=30,
        eos_token_id=NO_EOS,
        stop_strings=stop,
        include_stop_strings=False,
    )
    assert without == full[:cut]
    prompt_ids = tok.encode(prompt)
    ids = model.generate(
        [prompt_ids], max_new_tokens=30, eos_token_id=NO_EOS, stop_strings=[stop], tokenizer=tok
    )
    new = ids[0, len(prompt_ids) :]
    assert stop in tok.decode(new) and stop not in tok.decode(new[:-1])  # stopped on the completing token


def test_text_prompt_errors(qwen):
    model, tok, _ = qwen
    with pytest.raises(ValueError, match="empty"):
        mc.generate_text(model, tok, "")
    with pytest.raises(ValueError, match="context"):
        mc.generate_text(model, tok, "word " * 600)


# --- LoRA -------------------------------------------------------------------------------------------------


def test_lora_unmerged_and_merged_generate_the_same_tokens(fixtures):
    folder = fixtures / "tiny-qwen2"
    golden = np.load(folder / "golden.npz")
    model = mc.load_model(folder)
    model.load_adapter(folder / "lora" / "adapter_final")
    prompts = [golden["gen_prompt"][0].tolist(), golden["input_ids"][0].tolist()]
    runs = [
        dict(max_new_tokens=16),
        dict(max_new_tokens=12, num_beams=3),
        dict(max_new_tokens=16, do_sample=True, seed=1),
    ]
    unmerged = [model.generate(prompts, eos_token_id=NO_EOS, **r) for r in runs]
    model.merge_adapter()
    merged = [model.generate(prompts, eos_token_id=NO_EOS, **r) for r in runs]
    for a, b in zip(unmerged, merged, strict=True):
        np.testing.assert_array_equal(a, b)
    # The adapter is really in use: the next token is the argmax of transformers' merged logits.
    reference = np.sort(np.load(folder / "lora" / "trajectory.npz")["merged_logits"][0, -1])
    assert reference[-1] - reference[-2] > 1e-3  # a clear winner, so float noise cannot flip it
    first = model.generate(golden["input_ids"][:1], max_new_tokens=1, eos_token_id=NO_EOS)[0, -1]
    assert first == np.load(folder / "lora" / "trajectory.npz")["merged_logits"][0, -1].argmax()


def test_zero_new_tokens_returns_the_prompt_for_every_strategy(fixtures):
    model = mc.load_model(fixtures / "tiny-llama")
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    for kwargs in ({}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
        out = model.generate(prompt, max_new_tokens=0, **kwargs)
        want = np.repeat(prompt, kwargs.get("num_return_sequences", 1), axis=0)
        np.testing.assert_array_equal(out, want, err_msg=str(kwargs))
