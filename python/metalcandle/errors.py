"""The exceptions the command line turns into a one-line message: `UserError` (exit code 2) and
`TrainingInterrupted` (exit code 130)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong name). The CLI prints
    `error: <message>` and exits with code 2, without a traceback unless --debug."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`; the message says which checkpoint holds the work and how to resume.
    A KeyboardInterrupt still, so callers that stop on Ctrl-C keep doing so."""

    def __init__(self, message: str, checkpoint=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step
