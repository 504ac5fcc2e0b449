"""`tuneforge chat` with piped stdin: streamed replies equal greedy generation over the history, /reset
forgets it, EOF and Ctrl-C leave with exit code 0; `serve` without FastAPI names the extra to install."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tuneforge.cli import main
from tuneforge.data.masks import prompt_ids
from tuneforge.serve.loading import load_served


def _greedy_reply(served, messages: list[dict], n: int) -> str:
    ids = prompt_ids(served.tokenizer, served.chat_template, messages)
    out = served.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=served.stop_token_ids,
        pad_token_id=served.tokenizer.pad_token_id,
    )
    return served.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def _chat(model_dir, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneforge.cli",
            "chat",
            str(model_dir),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            *args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_piped_chat_keeps_history_resets_and_ends_at_eof(tiny_model_dir):
    proc = _chat(tiny_model_dir)
    out, err = proc.communicate("hello\nsecond\n/reset\nsecond\n", timeout=120)
    assert proc.returncode == 0, err[-2000:]
    served = load_served(tiny_model_dir, device="cpu")
    r1 = _greedy_reply(served, [{"role": "user", "content": "hello"}], 6)
    r2 = _greedy_reply(
        served,
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": "second"},
        ],
        6,
    )
    r3 = _greedy_reply(served, [{"role": "user", "content": "second"}], 6)
    assert out.split("\n") == [
        "chatting with tiny (context 128 tokens); /reset clears the history, /exit leaves",
        "you> hello",
        f"assistant> {r1}",
        "you> second",
        f"assistant> {r2}",
        "you> /reset",
        "(history cleared)",
        "you> second",
        f"assistant> {r3}",
        "bye",
        "",
    ]  # split on "\n" only: the random model's text may hold other line-break characters


@pytest.mark.integration
def test_exit_command_and_ctrl_c_leave_cleanly(tiny_model_dir):
    proc = _chat(tiny_model_dir)
    out, _ = proc.communicate("/exit\nnever read\n", timeout=120)
    assert proc.returncode == 0 and out.split("\n")[-3:] == ["you> /exit", "bye", ""]

    proc = _chat(tiny_model_dir)
    assert proc.stdout.readline().startswith("chatting with tiny")  # loaded, now waiting for input
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "bye\n" and "Traceback" not in err


def test_serve_without_fastapi_names_the_extra(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: `import fastapi` raises ImportError
    assert main(["serve", str(tiny_model_dir)]) == 1
    assert capsys.readouterr().err == (
        "error: tuneforge serve needs fastapi (not installed): pip install 'tuneforge[serve]'\n"
    )


def test_tool_calls_in_a_reply_are_shown_one_line_each():
    from tuneforge.serve.chat import call_lines

    reply = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert call_lines(reply) == ['  [tool call] get_weather(city="Paris", days=2)', "  [tool call] get_time()"]
    assert call_lines('{"name": "lookup", "parameters": {"q": "été"}}') == ['  [tool call] lookup(q="été")']
    assert call_lines("plain text") == []
    assert call_lines('<tool_call>{"name": broken}</tool_call>') == []
