"""Prompt files for `generate --file` and `export --prompts`: one reader, errors that name the file and line."""

import pytest

from tuneforge.cli import main
from tuneforge.cli.console import read_prompt_file
from tuneforge.config.load import ConfigError


def test_prompt_lines_give_text_or_chats_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert read_prompt_file(str(path)) == ["hi", [{"role": "user", "content": "yo"}]]


def test_a_bad_line_names_file_and_line_before_any_model_loads(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match=r'p.jsonl:2: expected a JSON object with "prompt" or "messages" \(KeyError'):
        read_prompt_file(str(path))
    for argv in (
        ["generate", str(tmp_path / "no-run"), "--file", str(path)],
        ["export", str(tmp_path / "no-run"), "--prompts", str(path)],
    ):
        assert main(argv) == 2
        assert 'p.jsonl:2: expected a JSON object with "prompt" or "messages"' in capsys.readouterr().err
