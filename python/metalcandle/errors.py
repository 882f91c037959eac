"""The one exception type the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong name). The CLI prints
    `error: <message>` and exits with code 2, without a traceback unless --debug."""
