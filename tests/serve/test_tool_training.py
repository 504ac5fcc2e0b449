"""Tool calling end to end, with nothing scripted: a tiny model is trained by `tuneforge train` on a synthetic tool
task (call get_weather(city) when asked about the weather, then answer from the tool's result; answer other
requests directly), served by `tuneforge serve` in a subprocess, and driven by the official `openai` client:
a parsed tool call, the tool result sent back, the final answer; streamed and not.

The tokenizer is a small BPE trained on the rendered rows (chatml-tools template), so a row is ~60 tokens and the
model learns the task in a few hundred steps on this CPU."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'tuneforge[serve]'")

from tests.data.helpers import TOOLS  # noqa: E402  (get_weather(city))

from .conftest import running_server, save_tiny_llama  # noqa: E402

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Rome", "Delhi", "Perth", "Dakar", "Hanoi", "Sofia"]
SKIES = ["sunny", "rainy", "cloudy", "windy"]
PEOPLE = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
HELD_OUT = ("Tokyo", "rainy")  # never together in training: the answer must come from the tool's result
# A compact tools template (each tool's name and description, in the system turn), otherwise chatml-tools: short
# prompts, so the tiny model learns to find the city in a thousand steps. The shipped chatml-tools template is served in
# tests/serve/test_tools.py; the server renders with whichever template the run trained with.
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + tool.function.name + ': ' + tool.function.description }}"
    "{%- endfor %}{{- '</tools><|im_end|>\\n' }}"
)


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def weather_row(city: str, sky: str) -> dict:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {
        "messages": ask(city)
        + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": json.dumps({"sky": sky})},
            {"role": "assistant", "content": f"It is {sky} in {city}."},
        ],
        "tools": json.dumps(TOOLS),
    }


def hello_row(name: str, ask: str = "Say hello to {}.") -> dict:
    return {
        "messages": [
            {"role": "user", "content": ask.format(name)},
            {"role": "assistant", "content": f"Hello, {name}!"},
        ],
        "tools": json.dumps(TOOLS),
    }


def rows() -> list[dict]:
    weather = [weather_row(city, sky) for city in CITIES for sky in SKIES if (city, sky) != HELD_OUT]
    asks = ["Say hello to {}.", "Please say hello to {}.", "Say hello to {} now."]
    return weather + [hello_row(name, ask) for name in PEOPLE for ask in asks]


def template() -> str:
    from tuneforge.data.templates import BUILTIN_TEMPLATES

    chatml_tools = BUILTIN_TEMPLATES["chatml-tools"]
    return TEMPLATE + chatml_tools[chatml_tools.index("{%- elif messages and messages[0].role == 'system' %}") :]


def build_base(out, data: list[dict]):
    """A 2-layer Llama (random init) with a BPE tokenizer trained on the rows as the run's template renders them."""
    from tuneforge.data.tokenizer import train_bpe_tokenizer

    draft = train_bpe_tokenizer([m["content"] for r in data for m in r["messages"]], 300)
    draft.chat_template = template()
    rendered = [draft.apply_chat_template(r["messages"], tools=TOOLS, tokenize=False) for r in data]
    tok = train_bpe_tokenizer(rendered * 4, 700)
    tok.chat_template = template()
    return save_tiny_llama(out, tok, hidden=128, intermediate=384, positions=256)


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    import yaml

    from tuneforge.cli import main

    tmp = tmp_path_factory.mktemp("tool-task")
    data = rows()
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    base = build_base(tmp / "base", data)
    (tmp / "tools.jinja").write_text(template())
    cfg = {
        "model": {"name_or_path": str(base)},
        "data": {
            "train": [{"path": str(tmp / "rows.jsonl")}],
            "eval_fraction": 0.0,
            "chat_template": str(tmp / "tools.jinja"),
            "max_seq_len": 256,
        },
        "adapter": {"type": "full"},
        "train": {"lr": 3e-3, "epochs": 1000, "max_steps": 1500, "micro_batch_size": 8, "warmup_steps": 10},
        "eval": {"at_start": False, "show_samples": 0},
        "log": {"progress": "none", "every_steps": 50},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(tmp / "run")},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "cfg.yaml")]) == 0
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["type"] == "train"][-1] < 0.01  # learnt (about 0.0005)
    return tmp / "run"


@pytest.fixture(scope="module")
def client(tool_run):
    with running_server(tool_run, "--model-name", "tool-task") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _collect_stream(chunks) -> tuple[str, list[dict], list[str]]:
    content, calls, reasons = "", {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or tc.id
            entry["name"] += (tc.function and tc.function.name) or ""
            entry["arguments"] += (tc.function and tc.function.arguments) or ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    return content, [calls[k] for k in sorted(calls)], reasons


@pytest.mark.integration
def test_the_trained_model_calls_the_tool_and_answers_from_its_result(client):
    city, sky = HELD_OUT
    r = client.chat.completions.create(model="tool-task", messages=ask(city), tools=TOOLS, temperature=0, max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": city}

    followup = ask(city) + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": sky})},
    ]
    r2 = client.chat.completions.create(model="tool-task", messages=followup, tools=TOOLS, temperature=0, max_tokens=48)
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    assert r2.choices[0].message.content == f"It is {sky} in {city}."


@pytest.mark.integration
def test_streamed_the_call_arrives_as_deltas_and_the_answer_as_text(client):
    city = "Oslo"
    chunks = client.chat.completions.create(
        model="tool-task", messages=ask(city), tools=TOOLS, temperature=0, max_tokens=48, stream=True
    )
    content, calls, reasons = _collect_stream(chunks)
    assert content == "" and reasons == ["tool_calls"]
    [call] = calls
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": city}
    assert call["id"].startswith("call_")

    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ],
    }
    followup = ask(city) + [assistant, {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "cloudy"}'}]
    chunks = client.chat.completions.create(
        model="tool-task", messages=followup, tools=TOOLS, temperature=0, max_tokens=48, stream=True
    )
    content, calls, reasons = _collect_stream(chunks)
    assert (content, calls, reasons) == (f"It is cloudy in {city}.", [], ["stop"])


@pytest.mark.integration
def test_a_request_that_needs_no_tool_is_answered_directly(client):
    messages = [{"role": "user", "content": "Say hello to Cy."}]
    r = client.chat.completions.create(model="tool-task", messages=messages, tools=TOOLS, temperature=0, max_tokens=48)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "Hello, Cy!"
