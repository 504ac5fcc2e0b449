"""What a command says and returns: exit codes, error and warning lines on stderr, the config loaded with its warnings shown."""

from __future__ import annotations

import sys
import warnings

from tuneforge.config.load import load_config

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _load(args) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(args.config, args.overrides)
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return cfg
