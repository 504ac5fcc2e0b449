"""Tool-call rows: the `tools` column reaches the chat template, assistant calls are trained, tool results are not;
ShareGPT's function_call / observation turns (LLaMA-Factory's glaive demo) and OpenAI's tool_calls; a template
that would drop them is an error naming one that renders them; a malformed call is an error naming its line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_path
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.fields import to_canonical
from tuneforge.data.formats import DataFormatError
from tuneforge.data.prepare import prepare
from tuneforge.data.rendering import TemplateChoiceError
from tuneforge.data.row_error import RowError
from tuneforge.data.templates import IGNORE_INDEX
from tuneforge.data.tool_calls import TOOLS_ROLE, for_template, parse_tool_calls, parse_tools

GLAIVE_ROWS = 24


def config(tmp_path, train: dict, **data) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"name_or_path": str(shared_path("tokenizers/qwen2.5"))},
            "data": {"train": [train], "max_seq_len": 2048, **data},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def runs(ids: list[int], labels: list[int], trained: bool) -> list[list[int]]:
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if (lab != IGNORE_INDEX) == trained:
            cur.append(i)
        elif cur:
            out, cur = [*out, cur], []
    return [*out, *([cur] if cur else [])]


def test_glaive_rows_train_their_calls_and_not_the_tool_results(tmp_path):
    path = shared_path("chat/glaive_toolcall_en_demo.json")
    source = json.loads(path.read_text(encoding="utf-8"))[:GLAIVE_ROWS]
    cfg = config(tmp_path, {"path": str(path), "max_rows": GLAIVE_ROWS}, dedup={"exact": False})
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    assert data.report["train"]["rows"] == GLAIVE_ROWS and data.report["train"]["truncated_rows"] == 0
    tok, rows = data.tokenizer, data.train
    calls = results = 0
    for row, src in zip(rows, source):
        assert next(m for m in row["messages"] if m["role"] == "user")["content"] == src["conversations"][0]["value"]
        trained = [tok.decode(r) for r in runs(row["input_ids"], row["labels"], True)]
        untrained = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX])
        for turn in src["conversations"]:
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                text = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
                assert f"<tool_call>\n{text}\n</tool_call><|im_end|>" in trained
                calls += 1
            elif turn["from"] == "observation":
                assert f"<tool_response>\n{turn['value']}\n</tool_response>" in untrained
                assert not any(turn["value"] in t for t in trained)
                results += 1
            elif turn["from"] == "gpt":
                assert f"{turn['value']}<|im_end|>" in trained
        schemas = json.loads(src["tools"] or "[]")
        assert ("# Tools" in untrained) == bool(schemas)  # tools= reached the template
        assert all(f'"name": "{t["name"]}", "description": "{t["description"]}"' in untrained for t in schemas)
    assert (calls, results) == (14, 14)  # the calls and results in the first 24 demo rows (11 have tools)


def test_data_preview_marks_the_call_and_not_the_result(tmp_path, capsys):
    import yaml

    path = tmp_path / "tools.jsonl"
    tools = [{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object"}}]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temperature": 22}'},
            {"from": "gpt", "value": "It is 22 C."},
        ],
        "tools": json.dumps(tools),
    }
    path.write_text(json.dumps(row) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(shared_path("tokenizers/qwen2.5"))},
                "data": {"train": [{"path": str(path)}], "max_seq_len": 512},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["data", "preview", str(cfg), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert (
        '<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\n"
        '{"temperature": 22}\n</tool_response><|im_end|>\n<|im_start|>assistant\n[[It is 22 C.<|im_end|>]]\n'
    ) in out
    assert '"description": "Weather in a city"' in out


def test_a_template_that_cannot_render_tools_is_an_error_naming_one_that_can(tmp_path, capsys):
    import yaml

    path = shared_path("chat/glaive_toolcall_en_demo.json")
    cfg = config(tmp_path, {"path": str(path), "max_rows": 4}, chat_template="chatml")
    with pytest.raises(
        TemplateChoiceError, match=r"the rows have tools and tool calls, which the chat template does not"
    ):
        prepare(cfg, tmp_path / "run", log=lambda s: None)
    phi = shared_path("chat_templates/llamacpp-microsoft-Phi-3.5-mini-instruct.jinja")  # drops every tool message
    file = tmp_path / "c.yaml"
    file.write_text(
        yaml.safe_dump(
            config(tmp_path, {"path": str(path), "max_rows": 4}, chat_template=str(phi)).model_dump(
                mode="json", exclude_unset=True
            )
        )
    )
    assert main(["prepare", str(file)]) == 2
    err = capsys.readouterr().err
    assert "which the chat template does not render (they would be dropped" in err
    assert "chatml-tools" in err and "Qwen2.5-7B-Instruct" in err and "Hermes-3-Llama-3.1-8B" in err


def test_openai_rows_with_tools_train_and_link_results(tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "call_a1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    row = {
        "messages": [
            {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_a1", "content": "5"},
            {"role": "assistant", "content": "5."},
        ],
        "tools": tools,
    }
    path = tmp_path / "openai.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = prepare(config(tmp_path, {"path": str(path)}), tmp_path / "run", log=lambda s: None)
    (stored,) = data.train
    assert [m["role"] for m in stored["messages"]] == [TOOLS_ROLE, "user", "assistant", "tool", "assistant"]
    assert json.loads(stored["messages"][2]["tool_calls"]) == [
        {**call, "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    ]
    assert stored["messages"][3]["tool_call_id"] == "call_a1"
    tok = data.tokenizer
    assert [tok.decode(r) for r in runs(stored["input_ids"], stored["labels"], True)] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
        "5.<|im_end|>",
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "[{oops"}]},
            r"`messages\[1\].tool_calls` is a string but not valid JSON",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
            r"`messages\[1\].tool_calls\[0\]` must be a tool call with a function name",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]},
                ]
            },
            r"`messages\[1\].tool_calls\[0\].arguments` must be a JSON object, got a list",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "get_weather(Paris)"},
                ]
            },
            r"`conversations\[1\].value` is a string but not valid JSON",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{bad"},
            r"`tools` is a string but not valid JSON",
        ),
    ],
)
def test_a_malformed_tool_call_is_an_error_naming_its_line(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "calls.jsonl"
    path.write_text(f"{json.dumps(good)}\n{json.dumps(row)}\n")
    with pytest.raises(DataFormatError, match=rf"calls.jsonl:2: {message}"):
        prepare(config(tmp_path, {"path": str(path)}), tmp_path / "run", log=lambda s: None)


def test_tool_fields_are_read_in_every_form():
    bare = {"name": "f", "description": "d", "parameters": {"type": "object"}}
    wrapped = [{"type": "function", "function": bare}]
    assert parse_tools(json.dumps([bare])) == parse_tools([bare]) == parse_tools(wrapped) == wrapped
    assert parse_tools("") is None and parse_tools("[]") is None and parse_tools(None) is None
    with pytest.raises(RowError, match=r"`tools\[0\]` must be a function schema with a `name`"):
        parse_tools([{"description": "no name"}])
    one = parse_tool_calls('{"name": "f", "arguments": "{\\"x\\": 1}"}', "value", first_id=3)
    assert one == [{"id": "call00003", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    row = {
        "conversations": [
            {"from": "human", "value": "q"},
            {
                "from": "function_call",
                "value": json.dumps([{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]),
            },
            {"from": "observation", "value": "F"},
            {"from": "observation", "value": "G"},
            {"from": "gpt", "value": "done"},
        ]
    }
    msgs = to_canonical(row, "sharegpt")["messages"]
    assert [m.get("tool_call_id") for m in msgs] == [None, None, "call00000", "call00001", None]
    shaped, tools = for_template(msgs, "string")
    assert tools is None and "content" not in shaped[1]  # a call without text has no content, as OpenAI's
    assert shaped[1]["tool_calls"][1] == {
        "id": "call00001",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    assert shaped[3] == {"role": "tool", "content": "G", "tool_call_id": "call00001", "name": "g"}


def test_rows_that_only_call_are_kept_by_the_filters_and_told_apart_by_their_calls(tmp_path):
    def row(city: str) -> dict:
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
        return {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": call}]}

    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(row(c)) + "\n" for c in ("Paris", "Rome", "Paris")))
    data = prepare(config(tmp_path, {"path": str(path)}), tmp_path / "run", log=lambda s: None)
    assert data.report["quality"] == {} and data.report["dedup"]["exact_removed"] == 1  # the second Paris only
    assert [data.tokenizer.decode(runs(r["input_ids"], r["labels"], True)[0]) for r in data.train] == [
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call><|im_end|>'
        for c in ("Paris", "Rome")
    ]
