"""Data: examples, label masking, windows, split, deterministic batches."""

import json

import numpy as np
import pytest

from metalcandle import data as D
from metalcandle.errors import UserError
from metalcandle.tokenizers import CharTokenizer, load_tokenizer

IGNORE = D.IGNORE


@pytest.fixture
def char():
    return CharTokenizer()


def test_text_windows_pack_the_stream(tmp_path, char):
    (tmp_path / "a.txt").write_text("abcdefghij")
    (tmp_path / "b.txt").write_text("klmno")
    ex = D.read_examples([tmp_path / "a.txt", tmp_path / "b.txt"], "auto", char, mask_prompt=True)
    eos = char.eos_token_id
    stream = char.encode("abcdefghij") + [eos] + char.encode("klmno") + [eos]
    w = D.build_windows(ex, seq_len=4, packing=True, pad_id=eos)
    # 17 tokens -> 4 full windows + one of a single token, which predicts nothing and is dropped.
    assert w.input_ids.dtype == np.int64 and w.input_ids.shape == (4, 4)
    np.testing.assert_array_equal(w.input_ids.reshape(-1), stream[:16])
    np.testing.assert_array_equal(w.labels, w.input_ids)  # the Trainer shifts
    assert w.num_tokens == 4 * 3


def test_unpacked_rows_are_padded_with_ignored_labels(tmp_path, char):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["abcdef", "xy"]) + "\n")
    ex = D.read_examples([tmp_path / "d.jsonl"], "auto", char, True)
    w = D.build_windows(ex, seq_len=5, packing=False, pad_id=0)
    eos = char.eos_token_id
    # "abcdef"+eos = 7 tokens -> 5 + 2 (padded); "xy"+eos = 3 (padded)
    assert w.input_ids.shape == (3, 5)
    np.testing.assert_array_equal(w.input_ids[1], char.encode("f") + [eos, 0, 0, 0])
    np.testing.assert_array_equal(w.labels[1], char.encode("f") + [eos, IGNORE, IGNORE, IGNORE])
    np.testing.assert_array_equal(w.labels[2], char.encode("xy") + [eos, IGNORE, IGNORE])


def test_completions_mask_the_prompt(tmp_path, char):
    rows = [{"prompt": "Q: 2+2?", "completion": " 4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (ex,) = D.read_examples([tmp_path / "c.jsonl"], "auto", char, mask_prompt=True)
    n = len("Q: 2+2?")
    assert ex.ids == char.encode("Q: 2+2? 4") + [char.eos_token_id]
    assert ex.labels == [IGNORE] * n + char.encode(" 4") + [char.eos_token_id]
    (unmasked,) = D.read_examples([tmp_path / "c.jsonl"], "completions", char, mask_prompt=False)
    assert unmasked.labels == unmasked.ids


def test_chat_learns_only_assistant_turns(tmp_path, fixtures):
    tok = load_tokenizer(fixtures / "tiny-qwen2")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (ex,) = D.read_examples([tmp_path / "chat.jsonl"], "auto", tok, mask_prompt=True)
    full = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert tok.decode(ex.ids) == full
    learned = tok.decode([t for t, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE])
    # Exactly the assistant replies with their end-of-turn markers (ChatML).
    assert learned == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    (plain,) = D.read_examples([tmp_path / "chat.jsonl"], "auto", tok, mask_prompt=False)
    assert plain.labels == plain.ids and tok.decode(plain.ids) == full


def test_jsonl_errors_name_file_and_line(tmp_path, char):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: missing key 'completion'"):
        D.read_examples([bad], "auto", char, True)
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        D.read_examples([bad], "auto", char, True)
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match="cannot tell the format"):
        D.read_examples([bad], "auto", char, True)
    with pytest.raises(UserError, match="data file not found"):
        D.read_examples([tmp_path / "missing.txt"], "auto", char, True)


def windows(n, seq_len=4):
    ids = np.arange(n * seq_len, dtype=np.int64).reshape(n, seq_len)
    return D.Windows(ids, ids.copy())


def test_split_is_seeded_disjoint_and_complete():
    w = windows(50)
    train, valid = D.split_windows(w, 0.2, seed=3)
    assert len(valid) == 10 and len(train) == 40
    rows = {tuple(r) for r in train.input_ids} | {tuple(r) for r in valid.input_ids}
    assert len(rows) == 50
    again_train, again_valid = D.split_windows(w, 0.2, seed=3)
    np.testing.assert_array_equal(valid.input_ids, again_valid.input_ids)
    _, other = D.split_windows(w, 0.2, seed=4)
    assert not np.array_equal(valid.input_ids, other.input_ids)


def test_batch_stream_epochs_and_resume():
    w = windows(10)
    s = D.BatchStream(w, batch_size=3, seed=0)
    seen = [s.next()[0] for _ in range(10)]  # 30 windows = 3 epochs
    firsts = np.concatenate(seen)[:, 0] // 4
    # Every epoch is a permutation of all windows, and epochs are shuffled differently.
    epochs = [sorted(firsts[i * 10 : (i + 1) * 10]) for i in range(3)]
    assert all(e == list(range(10)) for e in epochs)
    assert list(firsts[:10]) != list(firsts[10:20])
    # A new stream set to a saved position continues with the same batches.
    r = D.BatchStream(w, batch_size=3, seed=0)
    r.position = 12
    for i in range(4, 10):
        np.testing.assert_array_equal(r.next()[0], seen[i])


def test_eval_batches_are_fixed_and_capped():
    w = windows(7)
    b = D.eval_batches(w, batch_size=3, max_batches=2)
    assert [x[0].shape[0] for x in b] == [3, 3]
    b = D.eval_batches(w, batch_size=3, max_batches=5)
    assert [x[0].shape[0] for x in b] == [3, 3, 1]


def test_steps_for_epochs():
    assert D.steps_for_epochs(1, 100, 8, 2) == 7
    assert D.steps_for_epochs(0.5, 100, 10, 1) == 5
