"""Tool-call scores (eval/tool_call_eval.py): which held-out turns become prompts, and how answers are scored."""

import json

import datasets

from tests.data.helpers import CALL, TOOLS
from tuneforge.data.tool_calls import calls_text, tools_message
from tuneforge.eval.tool_call_eval import tool_call_prompts, tool_call_scores

LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def rows():
    def assistant(content="", calls=None):
        return {"role": "assistant", "content": content, "tool_calls": calls_text(calls) if calls else None}

    def msg(role, content):
        return {"role": role, "content": content, "tool_calls": None}

    berlin = [{**CALL[0], "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]
    return datasets.Dataset.from_list(
        [
            {  # two calling turns in one conversation: two prompts
                "messages": [
                    tools_message([*TOOLS, LOOKUP]),
                    msg("user", "Weather in Paris?"),
                    assistant(calls=CALL),
                    msg("tool", '{"sky": "sunny"}'),
                    assistant("Sunny."),
                    msg("user", "And Berlin?"),
                    assistant(calls=berlin),
                    msg("tool", '{"sky": "rain"}'),
                    assistant("Rain."),
                ]
            },
            {"messages": [msg("user", "Hi"), assistant("Hello!")]},  # no tools: no prompt
        ]
    )


def test_each_calling_turn_is_a_prompt_with_the_conversation_before_it():
    prompts, refs, names = tool_call_prompts(rows())
    assert [len(p) for p in prompts] == [2, 6]
    assert prompts[0][0]["role"] == "tools" and prompts[1][-1]["content"] == "And Berlin?"
    assert refs == [
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        [{"name": "get_weather", "arguments": {"city": "Berlin"}}],
    ]
    assert names == [{"get_weather", "lookup"}] * 2
    assert len(tool_call_prompts(rows(), n=1)[0]) == 1


def test_answers_are_scored_as_serve_parses_them():
    refs = [[{"name": "get_weather", "arguments": {"city": "Paris"}}]] * 6
    names = [{"get_weather", "lookup"}] * 6
    answers = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',  # exact
        '{"name": "get_weather", "parameters": {"city": "Lyon"}}',  # Llama-3.1 JSON: valid, right name, wrong city
        '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>',  # valid, wrong function
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',  # a function the row does not offer
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # broken JSON
        "It is sunny in Paris.",  # text
    ]
    scores = tool_call_scores(answers, refs, names)
    assert scores == {"tool_call_rows": 6, "tool_call_valid": 3 / 6, "tool_call_name": 2 / 6, "tool_call_exact": 1 / 6}
    assert json.loads(json.dumps(scores)) == scores
