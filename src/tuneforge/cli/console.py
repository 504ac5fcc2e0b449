"""What a command says and returns: exit codes, error and warning lines on stderr, the config loaded with its
warnings shown."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from tuneforge.config.load import ConfigError, load_config

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
    _check_input_files(cfg)
    return cfg


def _check_input_files(cfg) -> None:
    """Files the run reads besides its data, checked before anything is written or loaded: a GGUF model file
    (header, architecture, tensor types) and the forgetting check's text."""
    from tuneforge.model.gguf_source import inspect_gguf, is_gguf

    if is_gguf(cfg.model.name_or_path):
        inspect_gguf(cfg.model.name_or_path)
    if cfg.eval.general_text and not Path(cfg.eval.general_text).is_file():
        raise ConfigError(
            f"eval.general_text: {cfg.eval.general_text} does not exist; name a UTF-8 text file "
            "(e.g. wikitext2_valid.txt) or remove the key"
        )


def read_prompt_file(path: str) -> list[str | list[dict]]:
    """The prompts of a JSONL file, one per line: {"prompt": TEXT} gives the text, {"messages": [...]} the chat.
    A bad line is a ConfigError naming the file and line (exit 2, like any input error)."""
    prompts: list[str | list[dict]] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(row["messages"] if "messages" in row else row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f'{path}:{n}: expected a JSON object with "prompt" or "messages" ({type(e).__name__}: {e})'
            ) from None
    return prompts
