"""A model's tool calls, parsed out of its text as it streams: content deltas and complete calls.

Two output forms are recognised:
- Hermes / Qwen2.5 (the `chatml-tools` template): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any
  number of them, with text before or between them (an unclosed last block is parsed at the end of the output);
- Llama-3.1 JSON: the whole output is one JSON object `{"name": ..., "parameters": {...}}` (or `arguments`), or
  a JSON list of them, optionally after `<|python_tag|>`.

A block whose JSON does not parse, is not `{name, arguments}`, or names a function not in the request's tools
is returned as text, never dropped and never an error. Text is streamed as soon as it cannot be the start of a
call: a possible `<tool_call>` prefix and whitespace next to a call are held back; an output that starts with
`{` or `[` is held to its end (it may be a Llama-3.1 call). Whitespace between content and a call is dropped.
`chat_choice` and `stream_deltas` give the parsed output the shape of OpenAI's chat answer and stream chunks.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(obj: object, names: set[str] | None) -> ToolCall | None:
    """A call from a decoded `{name, arguments | parameters}` object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str, names: set[str] | None) -> list[ToolCall] | None:
    text = text.strip().removeprefix(PYTHON_TAG).strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    calls = [parse_call(o, names) for o in objs]
    return calls if calls and all(calls) else None


def _held(text: str) -> int:
    """Characters at the end of `text` that may begin `<tool_call>`, with the whitespace before them."""
    k = next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])), 0)
    head = text[: len(text) - k]
    return k + len(head) - len(head.rstrip())


class ToolCallParser:
    """Feed a choice's text deltas; get back ("content", text) and ("call", ToolCall) items in output order.
    `names`: the functions the request offers (calls to others stay text); None accepts any."""

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self.buf = ""
        self.mode = "start"  # start: only whitespace so far; text; call: inside <tool_call>; json: whole-output JSON
        self.first = True  # nothing emitted yet (a Llama-3.1 call can only be the whole output)
        self.calls: list[ToolCall] = []
        self.sent_text = False

    def _content(self, text: str) -> list[tuple[str, object]]:
        if not text:
            return []
        self.first = False
        self.sent_text = True
        return [("content", text)]

    def _call(self, call: ToolCall) -> list[tuple[str, object]]:
        self.first = False
        self.calls.append(call)
        return [("call", call)]

    def feed(self, delta: str) -> list[tuple[str, object]]:
        self.buf += delta
        out: list[tuple[str, object]] = []
        while True:
            if self.mode == "start":
                stripped = self.buf.lstrip()
                if not stripped:
                    return out
                if self.first and (stripped[0] in "{[" or stripped.startswith(PYTHON_TAG)):
                    self.mode = "json"
                    return out
                if self.first and PYTHON_TAG.startswith(stripped):  # may become <|python_tag|>: wait
                    return out
                if self.calls:  # whitespace after a call is not content
                    self.buf = stripped
                self.mode = "text"
            elif self.mode == "json":
                return out
            elif self.mode == "text":
                i = self.buf.find(OPEN)
                if i < 0:
                    hold = _held(self.buf)
                    out += self._content(self.buf[: len(self.buf) - hold])
                    self.buf = self.buf[len(self.buf) - hold :]
                    return out
                out += self._content(self.buf[:i].rstrip())
                self.buf, self.mode = self.buf[i + len(OPEN) :], "call"
            else:  # call
                j = self.buf.find(CLOSE)
                if j < 0:
                    return out
                inner, self.buf = self.buf[:j], self.buf[j + len(CLOSE) :]
                out += self._block(inner, True)
                self.mode = "start"

    def _block(self, inner: str, closed: bool) -> list[tuple[str, object]]:
        try:
            call = parse_call(json.loads(inner), self.names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return self._call(call)
        return self._content(OPEN + inner + (CLOSE if closed else ""))

    def finish(self) -> list[tuple[str, object]]:
        """The rest, once the output has ended."""
        buf, self.buf = self.buf, ""
        if self.mode == "json":
            calls = _json_calls(buf, self.names)
            if calls:
                return [item for c in calls for item in self._call(c)]
            return self._content(buf)
        if self.mode == "call":
            return self._block(buf, False)
        return self._content(buf.rstrip() if self.calls else buf)


def parse_output(text: str, names: set[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; content None when the model only called."""
    parser = ToolCallParser(names)
    items = parser.feed(text) + parser.finish()
    content = "".join(x for kind, x in items if kind == "content")
    calls = [x for kind, x in items if kind == "call"]
    return (content or None) if calls else content, calls


def chat_choice(text: str, reason: str, names: set[str] | None) -> dict:
    """A finished chat choice's message and finish reason; its tool calls parsed when the request offered tools."""
    if names is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": reason}
    content, calls = parse_output(text, names)
    if not calls:
        return {"message": {"role": "assistant", "content": content}, "finish_reason": reason}
    message = {"role": "assistant", "content": content, "tool_calls": [c.as_dict() for c in calls]}
    return {"message": message, "finish_reason": "tool_calls" if reason == "stop" else reason}


def stream_deltas(item: tuple[str, object], calls: list) -> list[dict]:
    """The chunk deltas of one parser item: content, or a call as the openai client assembles it (its index, id
    and name first, then its arguments)."""
    kind, x = item
    if kind == "content":
        return [{"content": x}]
    index = calls.index(x)  # its place among the choice's calls (ids are unique)
    return [
        {
            "tool_calls": [
                {"index": index, "id": x.id, "type": "function", "function": {"name": x.name, "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": index, "function": {"arguments": x.arguments}}]},
    ]
