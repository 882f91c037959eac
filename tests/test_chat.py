"""InteractivePrompt (context kept and trimmed through the chat template) and the scripted REPLs."""

import io

import pytest

import metalcandle as mc
from conftest import ScriptedModel
from metalcandle.chat import run_chat, run_generate

OPTIONS = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def qwen(fixtures):
    folder = fixtures / "tiny-qwen2"
    return mc.load_model(folder), mc.load_tokenizer(folder)


def prompt_tokens(tok, messages):
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def test_reply_is_generation_on_the_rendered_template(qwen):
    model, tok = qwen
    chat = mc.InteractivePrompt(model, tok, max_context_length=512, system_prompt="Be brief.", **OPTIONS)
    first = chat.send_message("What does the function return?")
    expected_prompt = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What does the function return?"},
        ],
        add_generation_prompt=True,
    )
    assert first == mc.generate_text(model, tok, expected_prompt, **OPTIONS).strip()
    second = chat.send_message("Thanks.")
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.history[2]["content"] == first and chat.history[4]["content"] == second
    expected = mc.generate_text(
        model, tok, tok.apply_chat_template(chat.history[:4], add_generation_prompt=True), **OPTIONS
    )
    assert second == expected.strip()
    assert chat.context_token_count() == len(tok.apply_chat_template(chat.history, tokenize=True))


def test_oldest_turns_are_dropped_first_and_only_as_needed(qwen):
    model, tok = qwen
    limit = 75
    chat = mc.InteractivePrompt(model, tok, max_context_length=limit, system_prompt="Be brief.", **OPTIONS)
    dropped_any = False
    for text in ["first question about lists", "second one, longer than before", "third", "and a fourth"]:
        before = list(chat.history)
        chat.send_message(text)
        kept, new_user = chat.history[:-1], chat.history[-2]
        assert chat.history[0] == {"role": "system", "content": "Be brief."}
        assert new_user == {"role": "user", "content": text}
        assert prompt_tokens(tok, kept) <= limit
        # What was kept is the newest part of the conversation; one more old turn would not have fit.
        candidates = before[1:] + [new_user]
        dropped = candidates[: len(candidates) - (len(kept) - 1)]
        assert kept[1:] == candidates[len(dropped) :]
        if dropped:
            assert prompt_tokens(tok, [kept[0], *dropped[-2:], *kept[1:]]) > limit
        dropped_any = dropped_any or bool(dropped)
    assert dropped_any
    assert "first question about lists" not in [m["content"] for m in chat.history]


def test_clear_and_too_long_message(qwen):
    model, tok = qwen
    chat = mc.InteractivePrompt(model, tok, max_context_length=40, system_prompt="Be brief.", **OPTIONS)
    chat.send_message("hi")
    chat.clear_context()
    assert chat.history == [{"role": "system", "content": "Be brief."}]
    with pytest.raises(ValueError, match="max_context_length"):
        chat.send_message("word " * 60)
    assert chat.history == [{"role": "system", "content": "Be brief."}]  # nothing half-added
    with pytest.raises(ValueError, match="context"):
        mc.InteractivePrompt(model, tok, max_context_length=10_000)


def test_plain_transcript_without_chat_template(qwen):
    _, tok = qwen
    plain = mc.Tokenizer(tok._backend, {k: v for k, v in tok.config.items() if k != "chat_template"})
    model = ScriptedModel(plain.encode("Sure thing.\nuser: more"), plain.vocab_size)
    chat = mc.InteractivePrompt(
        model, plain, max_context_length=200, system_prompt="Be brief.", max_new_tokens=40
    )
    assert chat.send_message("hello") == "Sure thing."  # the model's next "user:" line is cut off
    assert chat.render(chat.history, add_generation_prompt=True) == (
        "system: Be brief.\nuser: hello\nassistant: Sure thing.\nassistant:"
    )


def scripted_input(lines):
    items = iter(lines)

    def read(prompt):
        item = next(items)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_run_chat_commands(qwen):
    model, tok = qwen
    out = io.StringIO()
    lines = ["hello", "/clear", "/bogus", "", KeyboardInterrupt(), "second message", "/exit"]
    chat = run_chat(model, tok, OPTIONS, input_fn=scripted_input(lines), output=out)
    text = out.getvalue()
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["second message"]
    reply = chat.history[-1]["content"]
    assert (
        reply
        == mc.generate_text(
            model, tok, tok.apply_chat_template(chat.history[:1], add_generation_prompt=True), **OPTIONS
        ).strip()
    )
    assert reply in text
    # End of input leaves too.
    assert (
        run_chat(model, tok, OPTIONS, input_fn=scripted_input([EOFError()]), output=io.StringIO()).history
        == []
    )


class InterruptingOutput(io.StringIO):
    """A terminal where Ctrl-C arrives while the first reply piece is printed."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def write(self, text):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_not_the_session(qwen):
    _, tok = qwen
    script = tok.encode("one two three four five six")
    model = ScriptedModel(script, tok.vocab_size)
    out = InterruptingOutput()
    lines = iter(["tell me", "/exit"])

    def read(prompt):
        out.armed = True  # the next write is the reply
        return next(lines)

    chat = run_chat(model, tok, {"max_new_tokens": 6}, input_fn=read, output=out)
    assert "(reply stopped)" in out.getvalue()
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    assert chat.history[1]["content"] == tok.decode(script[:1])  # the part shown before Ctrl-C


def test_run_generate_streams_the_continuation(qwen):
    model, tok = qwen
    out = io.StringIO()
    text = run_generate(model, tok, "Return the number of items", {"max_new_tokens": 12}, output=out)
    assert text == mc.generate_text(model, tok, "Return the number of items", max_new_tokens=12)
    assert out.getvalue() == text + "\n"
