"""Type checks of the fields of one row, per format, and its conversion to the canonical shape.

A field of the wrong type (a number as instruction, a list as output, an object, null) or a missing required
field makes the row invalid: `RowError` says which field and what was expected. Nothing is stringified into
training text. OpenAI-style content parts (`[{"type": "text", "text": ...}]`) are text, joined as the server
joins them; a part of another kind (image, audio) is refused.

Formats and their fields (after `columns` renaming):
- alpaca:     instruction (string), output (string), input (string or null), system (string or null)
- messages:   messages: a non-empty list of {role, content}; content a string or a list of text parts
- sharegpt:   conversations: a non-empty list of {from, value} (strings); system (string or null)
- completion: text (string)
- preference, kto: see preference.py
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

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


class RowError(ValueError):
    """A row that does not fit its format. `reason` is what is counted (same for alike rows); str(self) adds
    the offending value."""

    def __init__(self, reason: str, value: str = ""):
        super().__init__(reason + value)
        self.reason = reason


def kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def shown(value: Any) -> str:
    """A short rendering of a value for an error message: ' (...)'."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return f" ({text[:60]}{'...' if len(text) > 60 else ''})"


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
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"`{name}[{j}]` must be an object {{role, content}}, got {kind(m)}", shown(m))
        role = m.get("role")
        if not isinstance(role, str):
            raise RowError(f"`{name}[{j}].role` must be a string, got {kind(role)}", shown(role))
        if role not in CHAT_ROLES:
            raise RowError(f"unknown role {role!r}", f"; expected one of {sorted(CHAT_ROLES)}")
        out.append({"role": role, "content": content_text(m.get("content"), f"{name}[{j}].content")})
    return out


def _sharegpt(f: Fields) -> list[dict]:
    name = f.name("conversations")
    conv = f.row.get("conversations")
    if not isinstance(conv, (list, tuple)) or not conv:
        raise RowError(f"`{name}` must be a non-empty list of {{from, value}}, got {kind(conv)}", shown(conv))
    system = f.text("system", False, "sharegpt")
    out = [{"role": "system", "content": system}] if system else []
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
        out.append({"role": SHAREGPT_ROLES[who.lower()], "content": value})
    return out


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
