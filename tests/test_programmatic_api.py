"""The scripting API beside the CLI: TextDataset, train_epoch/train_model, BasicTokenizer,
BPETokenizer, generate_text in its GPT-2 form, and the model presets."""

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend

import metalcandle as mc
from conftest import weights, write_corpus
from metalcandle.config import validate
from metalcandle.loading import scratch_model_config
from metalcandle.presets import PRESETS
from metalcandle.templates import from_preset


def tiny_model(vocab, seed=0, positions="rope", max_seq_len=64):
    return mc.Model.from_config(
        {
            "model_type": "custom-transformer",
            "vocab_size": vocab,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "d_ff": 64,
            "max_seq_len": max_seq_len,
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "positions": positions,
        },
        seed=seed,
    )


def test_text_dataset_windows_are_the_token_stream_shifted_by_one(tmp_path):
    write_corpus(tmp_path, 3000)
    (tmp_path / "b.txt").write_text("A second file.\n")
    tok = mc.CharTokenizer()
    ds = mc.TextDataset([tmp_path / "corpus.txt", tmp_path / "b.txt"], tok, seq_len=16)
    stream = tok.encode((tmp_path / "corpus.txt").read_text()) + [tok.eos_token_id]
    stream += tok.encode("A second file.\n") + [tok.eos_token_id]
    assert len(ds) == -(-(len(stream) - 16) // 16)
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert x.tolist() == stream[16 * i : 16 * i + 16] and y.tolist() == stream[16 * i + 1 : 16 * i + 17]
    a = [x.tolist() for x, _ in ds.batches(4, seed=1)]
    assert (
        a == [x.tolist() for x, _ in ds.batches(4, seed=1)] != [x.tolist() for x, _ in ds.batches(4, seed=2)]
    )
    assert sorted(r for b in a for r in map(tuple, b)) == sorted(tuple(ds[i][0]) for i in range(len(ds)))
    with pytest.raises(ValueError, match="too few"):
        mc.TextDataset(tmp_path / "b.txt", tok, seq_len=64)


def test_targets_train_exactly_like_the_window_one_token_longer(tmp_path):
    """(x, y) with y = x shifted is the same objective as labels on the window x + y[-1]."""
    write_corpus(tmp_path, 4000)
    tok = mc.CharTokenizer()
    ds = mc.TextDataset(tmp_path / "corpus.txt", tok, seq_len=24)
    a, b = tiny_model(tok.vocab_size), tiny_model(tok.vocab_size)
    ta = mc.Trainer(a, mc.AdamW(lr=3e-3))
    tb = mc.Trainer(b, mc.AdamW(lr=3e-3))
    for x, y in list(ds.batches(3, seed=0))[:4]:
        sa = ta.step(x, targets=y)
        w = np.concatenate([x, y[:, -1:]], axis=1)
        sb = tb.step(w, labels=w)
        assert sa.tokens == sb.tokens == x.size
        assert abs(sa.loss - sb.loss) < 1e-5 and abs(sa.grad_norm - sb.grad_norm) < 1e-4 * sb.grad_norm
    for name, value in weights(a).items():
        np.testing.assert_allclose(value, weights(b)[name], atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        ta.step(x, labels=x, targets=y)


def test_train_epoch_returns_the_token_weighted_mean_and_learns(tmp_path):
    write_corpus(tmp_path, 6000)
    tok = mc.CharTokenizer()
    ds = mc.TextDataset(tmp_path / "corpus.txt", tok, seq_len=32)
    model = tiny_model(tok.vocab_size)
    opt = mc.AdamW(lr=3e-3)
    before = mc.fit.evaluate(model, ds.batches(8, shuffle=False))
    first = mc.train_epoch(model, ds.batches(8, seed=0), opt, clip_grad_norm=1.0)
    second = mc.train_epoch(model, ds.batches(8, seed=1), opt, clip_grad_norm=1.0)
    after = mc.fit.evaluate(model, ds.batches(8, shuffle=False))
    assert second < first and after < before - 0.5


def test_train_model_resumes_after_the_last_saved_epoch_exactly(tmp_path):
    write_corpus(tmp_path, 3000)
    (tmp_path / "valid.txt").write_text((tmp_path / "corpus.txt").read_text()[:800])
    tok = mc.CharTokenizer()
    opts = dict(valid_sources=tmp_path / "valid.txt", seq_len=32, batch_size=8, lr=3e-3, warmup_steps=2)
    whole = tiny_model(tok.vocab_size)
    h = mc.train_model(whole, tok, tmp_path / "corpus.txt", epochs=2, checkpoint_dir=tmp_path / "a", **opts)
    assert len(h["train_loss"]) == len(h["val_loss"]) == 2 and h["val_loss"][1] < h["val_loss"][0]
    steps = -(-len(mc.TextDataset(tmp_path / "corpus.txt", tok, 32)) // 8)
    assert len(h["step_loss"]) == 2 * steps
    part = tiny_model(tok.vocab_size)

    def stop(epoch, history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped after the first epoch was saved
        mc.train_model(
            part, tok, tmp_path / "corpus.txt", epochs=2, checkpoint_dir=tmp_path / "b", callback=stop, **opts
        )
    resumed = tiny_model(tok.vocab_size, seed=7)  # its own weights are replaced by the checkpoint's
    h2 = mc.train_model(
        resumed, tok, tmp_path / "corpus.txt", epochs=2, checkpoint_dir=tmp_path / "b", **opts
    )
    assert h2["step_loss"] == h["step_loss"] and h2["val_loss"] == h["val_loss"]
    for name, value in weights(whole).items():
        np.testing.assert_array_equal(value, weights(resumed)[name])


def test_basic_tokenizer_builds_a_word_vocabulary_and_round_trips(tmp_path):
    tok = mc.BasicTokenizer().train(["The cat  sat.\nThe DOG sat, too.", "a cat"])
    vocab = {tok.id_to_token(i) for i in range(tok.vocab_size)}
    assert vocab == {"<unk>", "<pad>", "<|endoftext|>", "the", "cat", "sat", ".", "dog", ",", "too", "a"}
    ids = tok.encode("The  cat\tran.")
    assert [tok.id_to_token(i) for i in ids] == ["the", "cat", "<unk>", "."]
    assert tok.decode(ids) == "the cat <unk> ."
    assert tok.eos_token_id == 2 and tok.pad_token_id == 1
    cased = mc.BasicTokenizer(lowercase=False, normalize_whitespace=False, vocab_size=5).train(
        ["b b b a a c"]
    )
    assert [cased.id_to_token(i) for i in range(cased.vocab_size)] == [
        "<unk>",
        "<pad>",
        "<|endoftext|>",
        "b",
        "a",
    ]
    tok.save(tmp_path / "t")
    back = mc.BasicTokenizer.load(tmp_path / "t")
    assert back.encode("The  cat\tran.") == ids and back.options == tok.options
    # The file is a plain tokenizer.json: the tokenizers library alone gives the same ids.
    assert Backend.from_file(str(tmp_path / "t" / "tokenizer.json")).encode("The  cat\tran.").ids == ids


def test_bpe_tokenizer_is_train_bpe_as_an_object(tmp_path):
    text = (write_corpus(tmp_path, 20000) / "corpus.txt").read_text()
    tok = mc.BPETokenizer(vocab_size=320).train([text])
    ref = mc.train_bpe([text], vocab_size=320)
    assert tok.vocab_size == 320 and tok.encode(text[:500]) == ref.encode(text[:500])
    assert tok.decode(tok.encode(text[:500])) == text[:500]
    tok.save(tmp_path / "bpe")
    assert mc.BPETokenizer.load(tmp_path / "bpe").encode("Return the value") == tok.encode("Return the value")
    with pytest.raises(ValueError, match="before train"):
        mc.BPETokenizer(300).encode("x")


def test_generate_text_takes_the_gpt2_argument_names():
    tok = mc.CharTokenizer()
    model = tiny_model(tok.vocab_size)
    prompt = "Return the "
    greedy = mc.generate_text(model, tok, prompt, max_new_tokens=9)
    assert mc.generate_text(model, prompt, tokenizer=tok, max_length=len(prompt) + 9) == greedy
    assert mc.generate_text(model, prompt, tokenizer=tok, max_length=len(prompt) + 9, temperature=0) == greedy
    sampled = mc.generate_text(
        model, tok, prompt, max_new_tokens=9, do_sample=True, temperature=0.9, top_k=5, seed=3
    )
    spec = mc.generate_text(
        model, prompt, tokenizer=tok, max_length=len(prompt) + 9, temperature=0.9, top_k=5, seed=3
    )
    assert spec == sampled
    with pytest.raises(ValueError, match="not both"):
        mc.generate_text(model, prompt, tokenizer=tok, max_length=20, max_new_tokens=3)


def gpt2_parameters(d, layers, vocab, context, ff):
    """Closed form: token and position embeddings (tied head), per block two LayerNorms, qkv, the
    attention output, the MLP (all with biases), and the final LayerNorm."""
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    return vocab * d + context * d + layers * block + 2 * d


def test_gpt2_presets_have_the_published_shapes():
    assert gpt2_parameters(768, 12, 50257, 1024, 3072) == 124_439_808  # GPT-2 small
    raw = {"run": {"name": "g"}, "data": {"train": ["x.txt"]}, "train": {"max_steps": 1}}
    cfg = validate({**raw, "model": {"spec": {"preset": "gpt2-small", "n_layers": 1}}})
    spec = cfg["model"]["spec"]
    assert (spec["d_model"], spec["n_heads"], spec["d_ff"], spec["n_layers"]) == (768, 12, 3072, 1)
    assert cfg["data"]["seq_len"] == 1024 and cfg["tokenizer"]["kind"] == "bpe"
    assert cfg["tokenizer"]["vocab_size"] == 50257
    model = mc.Model.from_config(scratch_model_config(cfg, 50257))
    assert model.num_parameters() == gpt2_parameters(768, 1, 50257, 1024, 3072)
    for name, (d, layers, heads) in {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20)}.items():
        p = PRESETS[name]
        assert (p["d_model"], p["n_layers"], p["n_heads"], p["d_ff"]) == (d, layers, heads, 4 * d)
    with pytest.raises(Exception, match="model.spec.preset must be one of"):
        validate({**raw, "model": {"spec": {"preset": "gpt3"}}})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_init_preset_prints_a_config_that_validates(name, tmp_path):
    import tomllib

    cfg = validate(tomllib.loads(from_preset(name)))
    assert cfg["model"]["spec"]["preset"] == name
    assert cfg["model"]["spec"]["d_model"] == PRESETS[name]["d_model"]


def test_layer_overrides_from_toml_reach_the_model_and_survive_a_save(tmp_path):
    import tomllib

    raw = tomllib.loads(
        """
        [run]
        name = "lo"
        [model.spec]
        d_model = 32
        n_layers = 4
        n_heads = 4
        positions = "rope"
        norm = "rmsnorm"
        mlp = "swiglu"
        [[model.spec.layer_overrides]]
        layers = "0::2"
        sliding_window = 4
        [[model.spec.layer_overrides]]
        layers = [3]
        d_ff = 48
        n_heads = 8
        [data]
        train = ["x.txt"]
        seq_len = 16
        [train]
        max_steps = 1
        """
    )
    cfg = validate(raw)
    model = mc.Model.from_config(scratch_model_config(cfg, 50))
    layers = model.spec["layers"]
    assert [la["attention"]["sliding_window"] for la in layers] == [4, None, 4, None]
    assert layers[3]["mlp"]["intermediate_size"] == 48 and layers[3]["attention"]["num_heads"] == 8
    assert layers[3]["attention"]["num_kv_heads"] == 8 and layers[0]["mlp"]["intermediate_size"] == 128
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 12))
    model.save_pretrained(tmp_path / "m")
    back = mc.load_model(tmp_path / "m")
    assert back.spec == model.spec
    np.testing.assert_array_equal(back.forward(ids), model.forward(ids))
    bad = {
        **raw,
        "model": {"spec": {**raw["model"]["spec"], "layer_overrides": [{"layers": [4], "d_ff": 8}]}},
    }
    with pytest.raises(Exception, match=r"layer_overrides\[0\]\.layers.*out of range"):
        mc.Model.from_config(scratch_model_config(validate(bad), 50))
    with pytest.raises(Exception, match="changes nothing"):
        validate({**raw, "model": {"spec": {**raw["model"]["spec"], "layer_overrides": [{"layers": 1}]}}})
