"""Tool-call scores on held-out rows: does the model call a tool where the reference called one, and the right one?

Every held-out assistant turn that calls tools (`tool_calls`, e.g. a ShareGPT `function_call` turn of the glaive
data) is a prompt: the conversation before it, with the row's tools. The model's answer is parsed as serve parses
it (`infer/tool_parsing.py`: Hermes / Qwen2.5 `<tool_call>` blocks or Llama-3.1 JSON), accepting calls only to the
row's own tools, and scored against the reference calls:

  tool_call_valid   share of prompts answered with at least one well-formed call (valid JSON, {name, arguments},
                    a function the row offers)
  tool_call_name    share whose calls name the reference's functions, in order
  tool_call_exact   share whose calls equal the reference's: names and arguments (as JSON values)
  tool_call_rows    how many prompts were scored (a count, printed above the table)
"""

from __future__ import annotations

import json

from tuneforge.data.tool_calls import TOOLS_ROLE
from tuneforge.infer.tool_parsing import parse_output


def tool_call_prompts(dataset, n: int | None = None) -> tuple[list[list[dict]], list[list[dict]], list[set[str]]]:
    """(prompts, reference calls, offered function names): one per held-out assistant turn that calls tools, at
    most n. A reference call is {"name", "arguments": object}."""
    if "messages" not in dataset.column_names:
        return [], [], []
    prompts, refs, names = [], [], []
    for row in dataset.select_columns(["messages"]):
        msgs = row["messages"]
        tools = next((json.loads(m["content"]) for m in msgs if m["role"] == TOOLS_ROLE), None)
        if not tools:
            continue
        offered = {t.get("function", t)["name"] for t in tools}
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or not m.get("tool_calls"):
                continue
            calls = json.loads(m["tool_calls"])
            prompts.append(msgs[:i])
            refs.append([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls])
            names.append(offered)
            if n is not None and len(prompts) == n:
                return prompts, refs, names
    return prompts, refs, names


def tool_call_scores(generated: list[str], refs: list[list[dict]], names: list[set[str]]) -> dict[str, float]:
    """The scores of the module docstring for generations answering `tool_call_prompts`."""
    valid = name = exact = 0
    for text, ref, offered in zip(generated, refs, names, strict=True):
        _, calls = parse_output(text, offered)
        if not calls:
            continue
        valid += 1
        got = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
        name += [c["name"] for c in got] == [c["name"] for c in ref]
        exact += got == ref
    n = max(len(refs), 1)
    return {
        "tool_call_rows": len(refs),
        "tool_call_valid": valid / n,
        "tool_call_name": name / n,
        "tool_call_exact": exact / n,
    }
