"""The one base class of tuneforge's errors for people. Every stage raises a subclass whose message names the
file, the line or row, the key and the fix; `tuneforge` (cli) prints the message without a traceback and exits
with the class's `exit_code`: 2 for input to fix (a config key, a file, an argument), 1 for a run that failed.
Anything else that escapes is a bug and keeps its traceback."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_INPUT = 2


class TuneforgeError(Exception):
    """An error the person running tuneforge can act on; the message says what happened and what to do."""

    exit_code = EXIT_FAILED


class InputError(TuneforgeError):
    """The input must be fixed before anything can run: a config key, a file, a command-line argument."""

    exit_code = EXIT_INPUT
