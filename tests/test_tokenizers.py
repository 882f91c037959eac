"""Tokenizers: the fixture tokenizer (encode/decode/chat template as recorded), the char tokenizer's
policy, BPE training reproducing the fixture's trainer run, and save/load round trips."""

import json

import pytest

import metalcandle as mc
from metalcandle.tokenizers import CHAR_ALPHABET


@pytest.fixture(scope="module")
def golden(fixtures):
    return json.loads((fixtures / "tokenizer" / "tokenizer_golden.json").read_text())


@pytest.fixture(scope="module")
def tok(fixtures):
    return mc.load_tokenizer(fixtures / "tokenizer")


def test_special_tokens_and_length(tok):
    assert tok.vocab_size == len(tok) == 384
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (383, 381, None)
    assert tok.all_special_ids == [381, 382, 383]


def test_encode_decode_examples(tok, golden):
    for example in golden["encode_examples"]:
        assert tok.encode(example["text"]) == example["ids"]
        assert tok.decode(example["ids"]) == example["text"]
    with_specials = [e for e in golden["encode_examples"] if "<|im_start|>" in e["text"]]
    assert with_specials
    for example in with_specials:
        plain = example["text"].replace("<|im_start|>", "").replace("<|im_end|>", "")
        assert tok.decode(example["ids"], skip_special_tokens=True) == plain


def test_model_vocab_rows_beyond_the_tokenizer_decode_to_nothing(tok, golden):
    example = golden["encode_examples"][0]
    assert tok.decode([*example["ids"], 390, 399]) == example["text"]


def test_chat_template_matches_transformers(tok, golden):
    example = golden["chat_template_example"]
    kwargs = {"add_generation_prompt": example["add_generation_prompt"]}
    assert tok.apply_chat_template(example["messages"], **kwargs) == example["rendered"]
    assert tok.apply_chat_template(example["messages"], tokenize=True, **kwargs) == example["ids"]
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        tok.apply_chat_template(with_system)
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_model_folder_tokenizer_is_the_same(tok, fixtures, golden):
    folder_tok = mc.load_tokenizer(fixtures / "tiny-qwen2")
    text = golden["encode_examples"][0]["text"]
    assert folder_tok.encode(text) == tok.encode(text)
    assert folder_tok.chat_template == tok.chat_template


def test_save_and_load_round_trip(tok, tmp_path, golden):
    tok.save(tmp_path)
    again = mc.load_tokenizer(tmp_path)
    assert type(again) is mc.Tokenizer
    for example in golden["encode_examples"]:
        assert again.encode(example["text"]) == example["ids"]
    assert again.chat_template == tok.chat_template
    assert (again.eos_token_id, again.pad_token_id, again.vocab_size) == (383, 381, 384)


def test_missing_tokenizer_and_template_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        mc.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="chat_template"):
        mc.CharTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])


# --- char tokenizer ---------------------------------------------------------------------------------------


def test_char_tokenizer_policy():
    char = mc.CharTokenizer()
    assert char.vocab_size == 2 + 97 == len(CHAR_ALPHABET) + 2
    ids = char.encode(CHAR_ALPHABET)
    assert ids == list(range(2, 99))  # one id per character, in alphabet order
    assert char.decode(ids) == CHAR_ALPHABET
    assert (char.eos_token_id, char.pad_token_id, char.bos_token_id) == (1, 1, None)
    assert char.unknown_counts == {}


def test_char_tokenizer_counts_unknown_characters():
    char = mc.CharTokenizer()
    ids = char.encode("café\r\n東京é")
    unk = char.token_to_id("<unk>")
    assert ids == char.encode("caf") + [unk, unk] + char.encode("\n") + [unk, unk, unk]
    assert char.unknown_counts == {"é": 2, "\r": 1, "東": 1, "京": 1}
    assert "5 characters" in char.unknown_summary() and "'é' x2" in char.unknown_summary()
    assert char.count_unknown("ü!") == {"ü": 1}
    char.reset_unknown_counts()
    assert char.unknown_summary().startswith("no characters")
    assert char.decode(ids, skip_special_tokens=True) == "caf\n"


def test_char_tokenizer_special_strings_and_round_trip(tmp_path):
    char = mc.CharTokenizer()
    assert char.encode("ab<|endoftext|>") == char.encode("ab") + [1]
    char.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "char_tokenizer.json",
    }
    again = mc.load_tokenizer(tmp_path)
    assert isinstance(again, mc.CharTokenizer)
    text = "Hello,\n\tworld ~ 42!"
    assert again.encode(text) == char.encode(text) and again.decode(again.encode(text)) == text
    assert again.eos_token_id == 1


# --- BPE training -----------------------------------------------------------------------------------------


def test_train_bpe_reproduces_the_fixture_tokenizer(fixtures, tmp_path):
    # Same trainer settings as the fixtures' README: byte-level BPE, 381 learned ids, min_frequency 2,
    # corpus fed paragraph by paragraph, then three special tokens taking the last ids.
    corpus = (fixtures / "corpus.txt").read_text(encoding="utf-8")
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    trained = mc.train_bpe(corpus.split("\n\n"), vocab_size=384, special_tokens=specials)
    reference = json.loads((fixtures / "tokenizer" / "tokenizer.json").read_text())
    trained.save(tmp_path)
    mine = json.loads((tmp_path / "tokenizer.json").read_text())
    assert mine["model"]["vocab"] == reference["model"]["vocab"]
    assert mine["model"]["merges"] == reference["model"]["merges"]
    assert mine["added_tokens"] == reference["added_tokens"]
    assert mine["pre_tokenizer"] == reference["pre_tokenizer"]
    # A path is read as a file and split the same way: same tokenizer.
    from_file = mc.train_bpe(fixtures / "corpus.txt", vocab_size=384, special_tokens=specials)
    text = corpus[:2000]
    assert from_file.encode(text) == trained.encode(text) == mc.load_tokenizer(tmp_path).encode(text)
    assert mc.load_tokenizer(tmp_path).eos_token_id == 381


def test_train_bpe_is_deterministic_and_checks_size():
    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with five dozen jugs"] * 10
    a, b = mc.train_bpe(texts, vocab_size=300), mc.train_bpe(texts, vocab_size=300)
    assert a._backend.to_str() == b._backend.to_str()
    assert a.vocab_size <= 300 and a.token_to_id("<|endoftext|>") == a.vocab_size - 1
    assert a.decode(a.encode("the lazy fox")) == "the lazy fox"
    with pytest.raises(ValueError, match="too small"):
        mc.train_bpe(texts, vocab_size=200)
