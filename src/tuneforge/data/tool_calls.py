"""Tool-call rows: the `tools` column, assistant `tool_calls` and `tool` results, read and handed to chat templates.

Read (fields.py calls these): a row's `tools` is a list of function schemas, or a JSON string of one, each
OpenAI's `{"type": "function", "function": {name, description, parameters}}` or the bare `{name, description,
parameters}` (LLaMA-Factory / glaive). An assistant message's `tool_calls` are OpenAI's `[{id, type: function,
function: {name, arguments}}]`, arguments a JSON string or an object; ShareGPT's `function_call` turn holds one
call `{name, arguments}` (or a list of them) as JSON text, its `observation` turn the result. Calls without an
id get `call00000`, `call00001`, ... (9 letters and digits, as Mistral's templates require), and a tool result
without `tool_call_id` answers the earliest call not answered yet.

Stored (the canonical `messages` column): an assistant message keeps its text in `content` ("" when it only
calls) and its calls as JSON text in `tool_calls` (arguments as objects); a `tool` message its result in
`content` and the call it answers in `tool_call_id`. A row's tools travel with its messages as a first
message of role `tools` (TOOLS_ROLE, content: the schemas as JSON text), so that every stage that passes a
conversation on (tokenizing, evaluation prompts, previews) passes its tools too; it is never rendered as a
message: `for_template` turns it into the template's `tools=` argument.
"""

from __future__ import annotations

import json
from typing import Any

from tuneforge.data.row_error import RowError, kind, shown

TOOLS_ROLE = "tools"
TOOL_CALL_FORMAT = '{"id", "type": "function", "function": {"name", "arguments"}}'


def _json_value(value: Any, name: str) -> Any:
    """A field that may hold JSON text: the parsed value (a string that is not JSON is an error)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError(f"`{name}` is a string but not valid JSON ({e.msg} at column {e.colno})", shown(value)) from None


def parse_tools(value: Any, name: str = "tools") -> list[dict] | None:
    """The function schemas of a row's `tools` field (OpenAI form), or None when it has none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json_value(value, name)
    if not isinstance(value, (list, tuple)):
        raise RowError(
            f"`{name}` must be a list of function schemas (or JSON text of one), got {kind(value)}", shown(value)
        )
    return [_schema(t, f"{name}[{j}]") for j, t in enumerate(value)] or None


def _schema(tool: Any, name: str) -> dict:
    if not isinstance(tool, dict):
        raise RowError(f"`{name}` must be a function schema object, got {kind(tool)}", shown(tool))
    fn = tool["function"] if "function" in tool else tool
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError(
            f"`{name}` must be a function schema with a `name`: {{name, description, parameters}} or "
            '{"type": "function", "function": {name, description, parameters}}',
            shown(tool),
        )
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise RowError(f"`{name}` parameters must be an object (a JSON schema), got {kind(fn['parameters'])}")
    return {"type": "function", "function": fn}


def parse_tool_calls(value: Any, name: str, first_id: int = 0) -> list[dict]:
    """Tool calls in the stored form `[{id, type: function, function: {name, arguments: object}}]` from OpenAI's
    `tool_calls` (a list, or JSON text of one) or a ShareGPT `function_call` value (one `{name, arguments}`
    or a list); calls without an id are numbered from `first_id`."""
    value = _json_value(value, name)
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, (list, tuple)) or not calls:
        raise RowError(
            f"`{name}` must be a non-empty list of tool calls {TOOL_CALL_FORMAT} (or one {{name, arguments}}), "
            f"got {kind(value)}",
            shown(value),
        )
    out = []
    for k, call in enumerate(calls):
        where = f"{name}[{k}]" if len(calls) > 1 or isinstance(value, (list, tuple)) else name
        if not isinstance(call, dict):
            raise RowError(f"`{where}` must be a tool call {TOOL_CALL_FORMAT}, got {kind(call)}", shown(call))
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"`{where}` must be a tool call with a function name: {TOOL_CALL_FORMAT}", shown(call))
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            args = _json_value(args, f"{where}.arguments") if args.strip() else {}
        if not isinstance(args, dict):
            raise RowError(f"`{where}.arguments` must be a JSON object, got {kind(args)}", shown(args))
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RowError(f"`{where}.id` must be a string, got {kind(call_id)}", shown(call_id))
        out.append(
            {
                "id": call_id or f"call{first_id + k:05d}",
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out


def link_results(messages: list[dict]) -> list[dict]:
    """The messages with every `tool` result that names no call given the id of the earliest unanswered call."""
    pending: list[str] = []
    for m in messages:
        if m.get("tool_calls"):
            pending = [c["id"] for c in json.loads(m["tool_calls"])]
        elif m["role"] == "tool":
            if m.get("tool_call_id"):
                if m["tool_call_id"] in pending:
                    pending.remove(m["tool_call_id"])
            elif pending:
                m["tool_call_id"] = pending.pop(0)
    return messages


def tools_message(tools: list[dict]) -> dict:
    """The message that carries a row's tools (see the module's docstring)."""
    return {"role": TOOLS_ROLE, "content": json.dumps(tools, ensure_ascii=False)}


def calls_text(calls: list[dict]) -> str:
    return json.dumps(calls, ensure_ascii=False)


def uses_tools(messages: list[dict]) -> set[str]:
    """What of tool calling a conversation uses: 'tools', 'tool calls', 'tool results'."""
    used = set()
    for m in messages:
        if m["role"] == TOOLS_ROLE:
            used.add("tools")
        elif m["role"] == "tool":
            used.add("tool results")
        if m.get("tool_calls"):
            used.add("tool calls")
    return used


def _call_for_template(call: dict, arguments: str) -> dict:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if arguments == "string" and not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    elif arguments == "object" and isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # a string that is no JSON (a model's broken call) stays as it is
    out = {"type": "function", "function": {**fn, "arguments": args}}
    return {"id": call["id"], **out} if call.get("id") else out


def for_template(messages: list[dict], arguments: str = "object") -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as a chat template is given them: plain `{role, content}` messages, an assistant's calls
    as `tool_calls` with arguments as an object or JSON text (`arguments`: what the template renders) and no
    content when it only calls, a tool result with `tool_call_id` and the called function's `name`; the
    tools carried by a TOOLS_ROLE message. Takes stored rows and OpenAI requests alike."""
    out, tools, names = [], None, {}
    for m in messages:
        role = m["role"]
        calls = m.get("tool_calls")
        if role == TOOLS_ROLE:
            tools = json.loads(m["content"])
        elif calls:
            calls = [_call_for_template(c, arguments) for c in (json.loads(calls) if isinstance(calls, str) else calls)]
            names.update((c["id"], c["function"]["name"]) for c in calls if c.get("id"))
            # no content when it only calls: apply_chat_template drops keys that are None, so templates see it absent
            out.append({"role": role, **({"content": m["content"]} if m.get("content") else {}), "tool_calls": calls})
        elif role == "tool" and m.get("tool_call_id"):
            out.append({"role": role, "content": m["content"], "tool_call_id": m["tool_call_id"]})
            if m["tool_call_id"] in names:
                out[-1]["name"] = names[m["tool_call_id"]]
        else:
            out.append({"role": role, "content": m["content"]})
    return out, tools
