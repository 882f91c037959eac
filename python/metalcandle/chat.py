"""Conversations: `InteractivePrompt` keeps a chat within a context budget; `run_chat` and `run_generate`
are the terminal front ends behind `metalcandle chat` and `metalcandle generate`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from metalcandle.generate import stream_text

# Without a chat template the conversation is a plain transcript; a reply ends where the model starts
# writing the user's next line.
_PLAIN_STOP = "\nuser:"


class InteractivePrompt:
    """A conversation with a model. Each `send_message` renders the kept history plus the new user message
    (with the tokenizer's chat template, or as a "role: content" transcript when it has none) and
    generates a reply.

    When the rendered prompt would exceed `max_context_length` tokens, the oldest user/assistant turns are
    dropped, never the system prompt and never the newest message; after each reply the kept
    history, rendered, fits `max_context_length` again (older turns dropped, a reply too long to
    keep cut). The reply may use the room left in the context, at most `max_new_tokens` (default 256).
    Other keyword options go to `generate`
    (temperature, top_p, do_sample, seed, ...)."""

    def __init__(
        self, model, tokenizer, max_context_length: int, system_prompt: str | None = None, **gen_options
    ):
        if int(max_context_length) != max_context_length or max_context_length < 1:
            raise ValueError(f"max_context_length must be a positive integer, got {max_context_length!r}")
        context = model.max_position_embeddings
        if max_context_length > context:
            raise ValueError(
                f"max_context_length {max_context_length} exceeds the model's context of {context}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_context_length = int(max_context_length)
        self.system_prompt = system_prompt
        self.gen_options = {"max_new_tokens": 256, **gen_options}
        self.history: list[dict] = []
        self.clear_context()

    # --- context --------------------------------------------------------------------------------------
    def clear_context(self) -> None:
        """Forgets the conversation; the system prompt stays."""
        self.history = (
            [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.tokenizer.chat_template is not None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def _token_count(self, messages: list[dict], add_generation_prompt: bool) -> int:
        return len(self.tokenizer.encode(self.render(messages, add_generation_prompt)))

    def context_token_count(self) -> int:
        """Tokens of the kept history as rendered (without a generation prompt)."""
        return self._token_count(self.history, add_generation_prompt=False) if self.history else 0

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """Drops the oldest turns until the prompt (with the assistant header) fits the context;
        returns the kept messages and the prompt's ids."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        while len(ids := self.tokenizer.encode(self.render(system + turns, True))) > self.max_context_length:
            if len(turns) <= 1:
                raise ValueError(
                    f"the message alone needs {len(ids)} tokens, more than "
                    f"max_context_length={self.max_context_length}"
                )
            # A turn is a user message and the replies after it, so the kept history starts with a user.
            cut = 1
            while cut < len(turns) - 1 and turns[cut]["role"] != "user":
                cut += 1
            turns = turns[cut:]
        return system + turns, ids

    # --- talking --------------------------------------------------------------------------------------
    def stream_message(self, text: str) -> Iterator[str]:
        """Like `send_message`, yielding the reply in pieces. If the consumer stops early (Ctrl-C), the
        part of the reply produced so far is what the history keeps."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty")
        messages, ids = self._fit([*self.history, {"role": "user", "content": text}])
        options = dict(self.gen_options)
        options["max_new_tokens"] = min(options["max_new_tokens"], self.max_context_length - len(ids))
        if self.tokenizer.chat_template is None:
            options.setdefault("stop_strings", [_PLAIN_STOP])
            options.setdefault("include_stop_strings", False)
        previous, self.history = self.history, messages
        pieces: list[str] = []
        try:
            for piece in stream_text(self.model, self.tokenizer, ids, **options):
                pieces.append(piece)
                yield piece
        except (GeneratorExit, KeyboardInterrupt):
            self._keep_reply(pieces)
            raise
        except BaseException:
            self.history = previous  # a failed generation leaves no half turn behind
            raise
        else:
            self._keep_reply(pieces)

    def _keep_reply(self, pieces: list[str]) -> None:
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
        self._trim_history()

    def _fits(self, messages: list[dict]) -> bool:
        return self._token_count(messages, add_generation_prompt=False) <= self.max_context_length

    def _trim_history(self) -> None:
        """After a reply the kept history, rendered, must fit max_context_length too: the reply as
        re-tokenized and the template's end-of-turn tokens after it were not in the prompt's budget.
        The oldest turns go first; the system prompt and the newest exchange stay, with a reply too
        long to keep cut to the longest prefix that fits."""
        system = self.history[:1] if self.history and self.history[0]["role"] == "system" else []
        turns = self.history[len(system) :]
        while not self._fits(system + turns):
            users = [i for i, m in enumerate(turns) if m["role"] == "user"]
            if not users:
                turns = []
                break
            newest = users[-1]
            if newest > 0:
                cut = 1
                while cut < newest and turns[cut]["role"] != "user":
                    cut += 1
                turns = turns[cut:]
                continue
            reply = turns[-1]["content"] if turns and turns[-1]["role"] == "assistant" else None
            if reply is None or not self._fits(system + turns[:-1] + [{"role": "assistant", "content": ""}]):
                turns = []  # not even the exchange with an empty reply fits: keep the system prompt
                break
            lo, hi = 0, len(reply)  # longest prefix of the reply that fits: reply[:lo] fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._fits(system + turns[:-1] + [{"role": "assistant", "content": reply[:mid]}]):
                    lo = mid
                else:
                    hi = mid - 1
            turns = turns[:-1] + [{"role": "assistant", "content": reply[:lo]}]
        self.history = system + turns

    def send_message(self, text: str) -> str:
        """Adds the user message, generates the assistant's reply, keeps both, returns the reply."""
        return "".join(self.stream_message(text))


# --- terminal front ends ----------------------------------------------------------------------------------


def run_chat(
    model,
    tokenizer,
    gen_options: dict,
    system_prompt: str | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    max_context_length: int | None = None,
) -> InteractivePrompt:
    """A chat REPL: each line is a message, the reply streams to `output`. `/clear` forgets the
    conversation, `/exit` (or end of input) leaves, Ctrl-C during a reply stops that reply and keeps the
    session. `max_context_length` defaults to the model's context. Returns the conversation."""
    length = max_context_length or model.max_position_embeddings
    chat = InteractivePrompt(model, tokenizer, length, system_prompt=system_prompt, **gen_options)
    _say(output, "Type a message. /clear forgets the conversation, /exit leaves; Ctrl-C stops a reply.\n")
    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            _say(output, "\n")
            return chat
        except KeyboardInterrupt:
            _say(output, "\n(type /exit to leave)\n")
            continue
        command = line.strip()
        if command == "/exit":
            return chat
        if command == "/clear":
            chat.clear_context()
            _say(output, "(conversation cleared)\n")
        elif command.startswith("/"):
            _say(output, f"unknown command {command.split()[0]}; the commands are /clear and /exit\n")
        elif command:
            _stream_reply(chat, line, output)


def _stream_reply(chat: InteractivePrompt, text: str, output: TextIO) -> None:
    replies = chat.stream_message(text)
    try:
        for piece in replies:
            _say(output, piece)
        _say(output, "\n")
    except KeyboardInterrupt:
        replies.close()  # keeps the partial reply in the history
        _say(output, "\n(reply stopped)\n")
    except ValueError as error:
        _say(output, f"error: {error}\n")


def run_generate(model, tokenizer, prompt: str, gen_options: dict, output: TextIO = sys.stdout) -> str:
    """Streams the continuation of `prompt` to `output` as it is generated; returns the new text."""
    pieces = []
    for piece in stream_text(model, tokenizer, prompt, **gen_options):
        pieces.append(piece)
        _say(output, piece)
    _say(output, "\n")
    return "".join(pieces)


def _say(output: TextIO, text: str) -> None:
    output.write(text)
    output.flush()
