"""Tool calling in the server: the output parser (Hermes/Qwen `<tool_call>` blocks and Llama-3.1 JSON, whole and
streamed), request validation, and the official `openai` client round trip (call, tool result, answer).

The round trip runs the real server (create_app under uvicorn on 127.0.0.1, real HTTP and SSE) over the tiny
model with the built-in `chatml-tools` template; only the engine's sampler is replaced by a script that emits the
tokens of a fixed reply, so the model "calls" deterministically without training. Everything after the sampler
(detokenising, stop handling, parsing, streaming, the wire format) is the production path, and the prompts the
engine receives are checked to hold the rendered tools, call and result."""

from __future__ import annotations

import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'tuneforge[serve]'")

from tuneforge.data.templates import BUILTIN_TEMPLATES  # noqa: E402
from tuneforge.infer.tool_parsing import ToolCallParser, parse_output  # noqa: E402
from tuneforge.serve.loading import load_served  # noqa: E402

from .conftest import live_server  # noqa: E402

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SHORT_CALL = '<tool_call>{"name":"get_time"}</tool_call>'  # fewer tokens to generate in the server tests
NAMES = {"get_weather", "get_time"}


def _streamed(text: str, names=NAMES, step: int = 1):
    parser = ToolCallParser(names)
    items = []
    for k in range(0, len(text), step):
        items += parser.feed(text[k : k + step])
    return items + parser.finish()


def _summary(items):
    content = "".join(x for kind, x in items if kind == "content")
    return content, [(c.name, json.loads(c.arguments)) for kind, c in items if kind == "call"]


# --- the parser ---------------------------------------------------------------------------------------------------


def test_hermes_call_after_text_is_parsed_whole_and_streamed_alike():
    text = "Let me check.\n" + CALL
    content, calls = parse_output(text, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    for step in (1, 3, 7, len(text)):
        assert _summary(_streamed(text, step=step)) == ("Let me check.", [("get_weather", {"city": "Paris"})])
    # the text before the call streams before the call is complete
    parser = ToolCallParser(NAMES)
    early = parser.feed('Let me check.\n<tool_call>\n{"name": ')
    assert early == [("content", "Let me check.")]


def test_several_calls_and_text_between_them():
    text = (
        CALL
        + "\n"
        + '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>\nand then\n'
        + CALL
    )
    content, calls = parse_output(text, NAMES)
    assert content == "and then"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
        ("get_weather", {"city": "Paris"}),
    ]
    assert len({c.id for c in calls}) == 3
    assert _summary(_streamed(text, step=2)) == ("and then", [(c.name, json.loads(c.arguments)) for c in calls])


def test_invalid_json_unknown_function_and_unclosed_block_are_returned_as_text():
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    assert parse_output(bad, NAMES) == (bad, [])
    assert _summary(_streamed(bad)) == (bad, [])
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_output(unknown, NAMES) == (unknown, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse_output(no_name, NAMES) == (no_name, [])
    # one bad block among good ones: the good call is kept, the bad block is text
    content, calls = parse_output(CALL + "\n" + bad, NAMES)
    assert content == bad and [c.name for c in calls] == ["get_weather"]
    # an unclosed last block (the model stopped at its end-of-turn) is parsed when it is complete JSON
    content, calls = parse_output('<tool_call>\n{"name": "get_time", "arguments": {}}\n', NAMES)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    assert parse_output('<tool_call>\n{"name": "get_time", "argu', NAMES) == (
        '<tool_call>\n{"name": "get_time", "argu',
        [],
    )


def test_llama31_json_form():
    for text in (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ' {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    ):
        content, calls = parse_output(text, NAMES)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ], text
        assert _summary(_streamed(text)) == ("", [("get_weather", {"city": "Paris"})])
    content, calls = parse_output(
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]', NAMES
    )
    assert [c.name for c in calls] == ["get_weather", "get_time"] and json.loads(calls[0].arguments) == {"city": "Oslo"}
    # JSON that is not a call, and JSON in the middle of text, stay text
    assert parse_output('{"answer": 42}', NAMES) == ('{"answer": 42}', [])
    assert parse_output('{"name": "get_weather", "parameters": {"city": ', NAMES)[1] == []
    text = 'Use {"name": "get_weather", "parameters": {}} like this'
    assert parse_output(text, NAMES) == (text, [])


def test_plain_text_passes_through_exactly():
    for text in ("  hello <tool world \n\n", "a < b and <tool_c", "\n", ""):
        assert parse_output(text, NAMES) == (text, [])
        assert _summary(_streamed(text)) == (text, [])


# --- the server ---------------------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Script:
    """Stands in for the engine's sampler: each call returns the next token of `reply` (then EOS) for every row."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos, self.ids = tokenizer, eos, []

    def say(self, reply: str) -> None:
        self.ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]

    def __call__(self, logits, temperature, top_p, generator, own=None):
        token = self.ids.pop(0) if self.ids else self.eos
        return torch.full((logits.shape[0],), token, dtype=torch.long, device=logits.device)


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir):
    """(url, script, prompts): the tiny model with chatml-tools, its sampler scripted, the prompts it received."""
    served = load_served(tiny_model_dir, device="cpu")
    served.chat_template = BUILTIN_TEMPLATES["chatml-tools"]
    served.context_length = 1024  # the tool schemas alone exceed 128 tokens; RoPE runs past the config (scripted)
    script = Script(served.tokenizer, served.stop_token_ids[0])
    prompts: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        import tuneforge.infer.engine as engine_module

        mp.setattr(engine_module, "sample", script)
        real_submit = engine_module.Engine.submit

        def recording_submit(self, ids, params, on_event):
            prompts.append(served.tokenizer.decode(ids))
            return real_submit(self, ids, params, on_event)

        mp.setattr(engine_module.Engine, "submit", recording_submit)
        with live_server(served) as url:
            yield url, script, prompts


@pytest.mark.integration
def test_openai_client_round_trip_call_result_answer(tool_server):
    url, script, prompts = tool_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    script.say("Let me check.\n" + CALL)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tools>" in prompts[-1] and '"name": "get_weather"' in prompts[-1] and '"name": "get_time"' in prompts[-1]
    assert r.usage.completion_tokens == len(served_ids(script, "Let me check.\n" + CALL)) + 1

    script.say("It is sunny in Paris.")
    followup = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    r2 = client.chat.completions.create(model="tiny", messages=followup, tools=TOOLS, temperature=0)
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == "It is sunny in Paris." and not r2.choices[0].message.tool_calls
    # the call and its result were rendered as training renders them
    assert (
        '<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>" in prompts[-1]
    )
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>' in prompts[-1]


def served_ids(script: Script, text: str) -> list[int]:
    return script.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.integration
def test_openai_client_streams_content_then_call_deltas(tool_server):
    url, script, _ = tool_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    script.say("Let me check.\n" + CALL + "\n" + SHORT_CALL)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me check."
    first_call = next(k for k, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Let me check."  # text came first
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert entry["id"] is None  # the id comes once, with the name
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
    assert sorted(calls) == [0, 1]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values()) and calls[0]["id"] != calls[1]["id"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice_none_named_required_and_invalid_call(tool_server):
    url, script, prompts = tool_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    # none: the tools are not shown and the output is never parsed
    script.say(SHORT_CALL)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == SHORT_CALL
    assert not r.choices[0].message.tool_calls and "<tools>" not in prompts[-1]
    # a named function: only that tool is shown; a call to another one is text
    script.say(SHORT_CALL)
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert '"name": "get_weather"' in prompts[-1] and '"name": "get_time"' not in prompts[-1]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == SHORT_CALL
    # required with a model that answers in text: the text comes back, finish_reason stop (not enforced by decoding)
    script.say("Sunny.")
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    assert (r.choices[0].finish_reason, r.choices[0].message.content) == ("stop", "Sunny.")
    # invalid JSON in a call: 200 with the text
    bad = '<tool_call>{"name":get_time}</tool_call>'
    script.say(bad)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    assert (r.choices[0].finish_reason, r.choices[0].message.content) == ("stop", bad)


@pytest.mark.parametrize(
    "body, param, needle",
    [
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools.0.function.name",
            "required",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        ({"tool_choice": "required"}, "tool_choice", "requires tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "twice"),
        ({"messages": ASK + [{"role": "tool", "content": "{}"}]}, "messages.1.tool_call_id", "tool_call_id"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(tool_server, body, param, needle):
    url, _, _ = tool_server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_a_template_without_tools_is_refused_with_400(tiny_model_dir):
    served = load_served(tiny_model_dir, device="cpu")  # the plain chatml template: it cannot render tools
    with live_server(served) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK, "tools": TOOLS}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tools" and "does not render tools" in err["message"], err


@pytest.mark.parametrize(
    "tokenizer, template, call_text",
    [
        (
            "qwen2.5",
            "llamacpp-Qwen-Qwen2.5-7B-Instruct.jinja",
            '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        ),
        (
            "llama3",
            "llamacpp-meta-llama-Llama-3.1-8B-Instruct.jinja",
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ),
    ],
)
def test_real_templates_render_the_request_and_their_call_form_parses(tokenizer, template, call_text):
    """A request with tools, an earlier call and its result, through the server's prompt path with real
    tokenizers and community templates (../shared/data); the call as each template writes it parses back."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneforge.serve.protocol import ChatCompletionRequest
    from tuneforge.serve.server import _chat_ids

    from ..conftest import shared_path

    tok = AutoTokenizer.from_pretrained(shared_path(f"tokenizers/{tokenizer}"))
    served = SimpleNamespace(
        tokenizer=tok, chat_template=shared_path(f"chat_templates/{template}").read_text(), context_length=10**5
    )
    req = ChatCompletionRequest.model_validate(
        {
            "messages": ASK
            + [
                {"role": "assistant", "content": None, "tool_calls": [_openai_call("call_1", '{"city": "Paris"}')]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": TOOLS[:1],
        }
    )
    req.refuse_unsupported()
    text = tok.decode(_chat_ids(served, [m.as_dict() for m in req.messages], None, req.offered_tools()))
    assert call_text in text and '"description": "The weather in a city"' in text and "sunny" in text
    reply = call_text.split("\n", 1)[1] if tokenizer == "qwen2.5" else call_text.split("\n\n", 1)[1]
    content, calls = parse_output(reply, {"get_weather"})
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def _openai_call(call_id: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
