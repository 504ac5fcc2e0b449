"""Type checks of the fields of one row, per format, and its conversion to the canonical shape.

A field of the wrong type (a number as instruction, a list as output, an object, null) or a missing required
field makes the row invalid: `RowError` says which field and what was expected. Nothing is stringified into
training text. OpenAI-style content parts (`[{"type": "text", "text": ...}]`) are text, joined as the server
joins them; a part of another kind (image, audio) is refused.

Formats and their fields (after `columns` renaming):
- alpaca:     instruction (string), output (string), input (string or null), system (string or null)
- messages:   messages: a non-empty list of {role, content}; content a string or a list of text parts; an assistant
              message may hold OpenAI `tool_calls` (content then null or ""), a `tool` message `tool_call_id`;
              tools (function schemas: a list or JSON text, or null)
- sharegpt:   conversations: a non-empty list of {from, value} (strings), `function_call` / `observation` turns
              for tool calls and their results; system (string or null); tools (as above)
- completion: text (string)
- preference, kto: see preference.py
Tool calls and tools are read and stored as tool_calls.py says.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tuneforge.data.row_error import RowError, kind, shown
from tuneforge.data.tool_calls import calls_text, link_results, parse_tool_calls, parse_tools, tools_message

__all__ = ["RowError", "kind", "shown"]  # (re-exported: formats.py and preference.py take them from here)

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
CHAT_ROLES = {"system", "user", "assistant", "tool"}
# a row with the fields of several votes for the first (a pair's `conversations`, a KTO row's `messages`)
FORMATS = ("preference", "kto", "messages", "sharegpt", "alpaca", "completion")
MARKERS = {
    "preference": ("chosen", "rejected"),
    "kto": ("messages", "label"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("text",),
}
DETECT_ROWS = 1000  # auto-detection votes over this many first rows


class Fields:
    """The row's fields under tuneforge's names, reported under the user's names (`columns` renaming)."""

    def __init__(self, row: dict, names: dict[str, str] | None = None):
        self.row, self.names = row, names or {}

    def name(self, field: str) -> str:
        return self.names.get(field, field)

    def present(self, field: str) -> bool:
        return self.row.get(field) is not None

    def text(self, field: str, required: bool, fmt: str) -> str:
        value = self.row.get(field)
        if value is None:
            if required:
                raise RowError(
                    f"missing field `{self.name(field)}` (absent or null): every {fmt} row needs it as a string"
                )
            return ""
        if not isinstance(value, str):
            raise RowError(f"field `{self.name(field)}` must be a string, got {kind(value)}", shown(value))
        return value


def content_text(value: Any, field: str) -> str:
    """A message content as text: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if value is None:
        raise RowError(
            f"`{field}` is missing or null: every message needs its content as a string or a list of text parts"
        )
    if not isinstance(value, (list, tuple)):
        raise RowError(f"`{field}` must be a string or a list of text parts, got {kind(value)}", shown(value))
    texts = []
    for k, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RowError(
                f'`{field}[{k}]` must be a content part {{"type": "text", "text": ...}}, got {kind(part)}', shown(part)
            )
        if part["type"] != "text":
            raise RowError(
                f"`{field}[{k}]` is a content part of type {part['type']!r}: tuneforge trains on text only; "
                "drop the non-text parts or the row"
            )
        if not isinstance(part.get("text"), str):
            text = part.get("text")
            raise RowError(f"`{field}[{k}].text` must be a string, got {kind(text)}", shown(text))
        texts.append(part["text"])
    return "".join(texts)


def _alpaca(f: Fields) -> list[dict]:
    instruction = f.text("instruction", True, "alpaca").strip()
    extra = f.text("input", False, "alpaca").strip()
    output = f.text("output", True, "alpaca")
    system = f.text("system", False, "alpaca")
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]


def _messages(f: Fields) -> list[dict]:
    name = f.name("messages")
    msgs = f.row.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowError(f"`{name}` must be a non-empty list of {{role, content}}, got {kind(msgs)}", shown(msgs))
    out: list[dict] = []
    n_calls = 0
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"`{name}[{j}]` must be an object {{role, content}}, got {kind(m)}", shown(m))
        role = m.get("role")
        if not isinstance(role, str):
            raise RowError(f"`{name}[{j}].role` must be a string, got {kind(role)}", shown(role))
        if role not in CHAT_ROLES:
            raise RowError(f"unknown role {role!r}", f"; expected one of {sorted(CHAT_ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and calls != []:
            parsed = parse_tool_calls(calls, f"{name}[{j}].tool_calls", n_calls)
            n_calls += len(parsed)
            content = m.get("content")
            text = "" if content is None else content_text(content, f"{name}[{j}].content")
            out.append({"role": role, "content": text, "tool_calls": calls_text(parsed)})
            continue
        out.append({"role": role, "content": content_text(m.get("content"), f"{name}[{j}].content")})
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise RowError(f"`{name}[{j}].tool_call_id` must be a string, got {kind(m['tool_call_id'])}")
            out[-1]["tool_call_id"] = m["tool_call_id"]
    return with_tools(f, link_results(out))


def _sharegpt(f: Fields) -> list[dict]:
    name = f.name("conversations")
    conv = f.row.get("conversations")
    if not isinstance(conv, (list, tuple)) or not conv:
        raise RowError(f"`{name}` must be a non-empty list of {{from, value}}, got {kind(conv)}", shown(conv))
    system = f.text("system", False, "sharegpt")
    out = [{"role": "system", "content": system}] if system else []
    n_calls = 0
    for j, m in enumerate(conv):
        if not isinstance(m, dict):
            raise RowError(f"`{name}[{j}]` must be an object {{from, value}}, got {kind(m)}", shown(m))
        who, value = m.get("from"), m.get("value")
        if not isinstance(who, str):
            raise RowError(f"`{name}[{j}].from` must be a string, got {kind(who)}", shown(who))
        if who.lower() not in SHAREGPT_ROLES:
            raise RowError(f"unknown speaker {who.lower()!r}", f"; expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise RowError(f"`{name}[{j}].value` must be a string, got {kind(value)}", shown(value))
        if who.lower() == "function_call":
            calls = parse_tool_calls(value, f"{name}[{j}].value", n_calls)
            n_calls += len(calls)
            out.append({"role": "assistant", "content": "", "tool_calls": calls_text(calls)})
        else:
            out.append({"role": SHAREGPT_ROLES[who.lower()], "content": value})
    return with_tools(f, link_results(out))


def with_tools(f: Fields, messages: list[dict]) -> list[dict]:
    """The messages, led by the message that carries the row's `tools` when it has any (see tool_calls.py)."""
    tools = parse_tools(f.row.get("tools"), f.name("tools"))
    return [tools_message(tools), *messages] if tools else messages


def row_format(row: dict, candidates: tuple[str, ...] = FORMATS) -> str | None:
    """The format whose fields the row has (the first of `candidates`), or None."""
    return next((fmt for fmt in candidates if any(row.get(k) is not None for k in MARKERS[fmt])), None)


def candidate_formats(columns: list[str]) -> tuple[str, ...]:
    """The formats whose required fields are all among a source's columns, in the order of FORMATS."""
    return tuple(fmt for fmt in FORMATS if set(MARKERS[fmt]) <= set(columns))


def vote(rows: list[dict], candidates: tuple[str, ...] = FORMATS) -> tuple[str | None, Counter]:
    """The format most of `rows` have among `candidates` (ties: the first of FORMATS), and the votes."""
    votes = Counter(f for f in (row_format(r, candidates) for r in rows) if f is not None)
    if not votes:
        return None, votes
    return max(FORMATS, key=lambda f: (votes[f], -FORMATS.index(f))), votes


def to_canonical(row: dict, fmt: str, names: dict[str, str] | None = None, why_fmt: str = "") -> dict:
    """{messages, text} of one row of format `fmt`, or RowError. `why_fmt`: how the format was chosen (for the
    message when the row is of another format)."""
    f = Fields(row, names)
    if not any(f.present(k) for k in MARKERS[fmt]):
        other = row_format(row)
        if other is not None:
            has = " and ".join(f"`{f.name(k)}`" for k in MARKERS[other] if f.present(k))
            raise RowError(
                f"the row is a {other} row (it has {has}), but this source's rows are {fmt}{why_fmt} "
                "(a source holds rows of one format: move it to a source of its own)"
            )
    if fmt == "completion":
        return {"messages": [], "text": f.text("text", True, "completion")}
    msgs = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}[fmt](f)
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("the row has no assistant turn, so nothing would be trained")
    return {"messages": msgs, "text": ""}
