"""The exceptions the command line turns into a one-line message: `UserError` (exit code 2) and
`TrainingInterrupted` (exit code 130), and the did-you-mean hint those messages share."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong name). The CLI prints
    `error: <message>` and exits with code 2, without a traceback unless --debug."""


class BadFileError(UserError, ValueError):
    """A file (checkpoint state, registry, metadata, data) that cannot be read as what it should
    be; the message names the file. A ValueError too, as for every other malformed input."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`; the message says which checkpoint holds the work and how to resume.
    A KeyboardInterrupt still, so callers that stop on Ctrl-C keep doing so."""

    def __init__(self, message: str, checkpoint=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


def did_you_mean(name: str, options) -> str:
    """` (did you mean 'x'?)` for the closest of `options`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
