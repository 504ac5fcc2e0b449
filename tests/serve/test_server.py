"""`tuneforge serve` as a real subprocess on 127.0.0.1, answered by the official `openai` client and raw HTTP:
exact texts and usage against plain `model.generate`, streaming, API key, every bad request's 4xx body,
and a client disconnect freeing its slot."""

from __future__ import annotations

import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'tuneforge[serve]'")

from tuneforge.data.masks import prompt_ids
from tuneforge.serve.loading import load_served

from .conftest import CONTEXT, running_server

MESSAGES = [
    {"role": "system", "content": "You reverse words."},
    {"role": "user", "content": "Reverse the order of these words.\n\nrocket candle island"},
]
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_adapter_server(tiny_adapter_run):
    """The LoRA run (base + adapter, not merged), with an API key."""
    with running_server(tiny_adapter_run, "--api-key", KEY, "--model-name", "my-lora") as url:
        yield url


def _greedy(served, ids: list[int], n: int) -> tuple[str, int]:
    out = served.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=served.stop_token_ids,
        pad_token_id=served.tokenizer.pad_token_id,
    )
    new = out[0, len(ids) :].tolist()
    return served.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_served(tiny_model_dir, device="cpu")


def test_chat_completion_matches_generate_with_exact_usage(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    ids = prompt_ids(reference.tokenizer, reference.chat_template, MESSAGES)
    text, n = _greedy(reference, ids, 12)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_chat_stream_sends_the_same_text_then_done(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    ids = prompt_ids(reference.tokenizer, reference.chat_template, MESSAGES)
    text, n = _greedy(reference, ids, 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length" if n == 12 else "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    raw = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")


def test_completions_plain_streamed_n_and_stop(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    tok = reference.tokenizer
    ids = tok("apple river stone")["input_ids"]
    text, n = _greedy(reference, ids, 10)
    r = client.completions.create(model="tiny", prompt="apple river stone", max_tokens=10, temperature=0)
    assert r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    streamed = client.completions.create(
        model="tiny", prompt="apple river stone", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text

    two = client.completions.create(model="tiny", prompt=["apple river stone", "x"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text == _greedy(reference, ids, 4)[0]
    assert two.usage.prompt_tokens == len(ids) + len(tok("x")["input_ids"])

    stop = text[4:7]
    cut = client.completions.create(model="tiny", prompt="apple river stone", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def _error(resp: httpx.Response) -> tuple[int, str | None, str | None]:
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return resp.status_code, err["param"], err["code"]


def test_every_bad_request_gets_its_4xx_openai_error(server):
    chat, comp = f"{server}/v1/chat/completions", f"{server}/v1/completions"
    long_prompt = " ".join(["apple"] * 200)
    cases = [
        (
            httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}),
            (400, None, "invalid_json"),
        ),
        (httpx.post(chat, json=["a list"]), (400, None, "invalid_json")),
        (httpx.post(chat, json={"model": "gpt-4", "messages": MESSAGES}), (404, "model", "model_not_found")),
        (httpx.post(chat, json={"messages": MESSAGES, "max_tokens": -1}), (400, "max_tokens", "invalid_value")),
        (httpx.post(chat, json={"messages": MESSAGES, "max_tokens": 0}), (400, "max_tokens", "invalid_value")),
        (httpx.post(chat, json={"messages": MESSAGES, "temperature": 2.5}), (400, "temperature", "invalid_value")),
        (httpx.post(chat, json={"messages": MESSAGES, "top_p": 0}), (400, "top_p", "invalid_value")),
        (httpx.post(chat, json={"messages": MESSAGES, "n": 0}), (400, "n", "invalid_value")),
        (
            httpx.post(chat, json={"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}),
            (400, "stop", "invalid_value"),
        ),
        (httpx.post(chat, json={"messages": []}), (400, "messages", "invalid_value")),
        (httpx.post(chat, json={"max_tokens": 4}), (400, "messages", "missing_required_parameter")),
        (
            httpx.post(chat, json={"messages": [{"role": "robot", "content": "hi"}]}),
            (400, "messages.0.role", "invalid_value"),
        ),
        (
            httpx.post(chat, json={"messages": [{"role": "user", "content": long_prompt}]}),
            (400, "messages", "context_length_exceeded"),
        ),
        (
            httpx.post(chat, json={"messages": MESSAGES, "max_tokens": CONTEXT}),
            (400, "max_tokens", "context_length_exceeded"),
        ),
        (httpx.post(comp, json={"prompt": "x", "echo": True}), (400, "echo", "unsupported_parameter")),
        (httpx.post(chat, json={"messages": MESSAGES, "top_logprobs": 2}), (400, "top_logprobs", "invalid_value")),
        (
            httpx.post(chat, json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}),
            (400, "top_logprobs", "invalid_value"),
        ),
        (httpx.post(comp, json={"prompt": "x", "logprobs": -1}), (400, "logprobs", "invalid_value")),
        (httpx.post(comp, json={"prompt": long_prompt}), (400, "prompt", "context_length_exceeded")),
        (httpx.post(comp, json={"prompt": [1, 2, 10**6]}), (400, "prompt", "invalid_value")),
        (httpx.post(comp, json={"prompt": []}), (400, "prompt", "invalid_value")),
        (httpx.post(comp, json={"prompt": "x", "max_tokens": "many"}), (400, "max_tokens", "invalid_value")),
        (httpx.get(f"{server}/v1/nothing-here"), (404, None, None)),
    ]
    for resp, want in cases:
        assert _error(resp) == want, resp.text
    msg = httpx.post(chat, json={"messages": MESSAGES, "max_tokens": 0}).json()["error"]["message"]
    assert msg == "invalid value for max_tokens: 0 (Input should be greater than or equal to 1)"
    msg = httpx.post(chat, json={"model": "gpt-4", "messages": MESSAGES}).json()["error"]["message"]
    assert msg == "the model 'gpt-4' does not exist; this server serves 'tiny' (see GET /v1/models)"
    # the openai client raises its typed errors from these bodies
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="greater than or equal to 1"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # still serving


def test_client_disconnect_mid_stream_frees_its_slot(server):
    before = httpx.get(f"{server}/health").json()["finished"].get("cancelled", 0)
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={"prompt": "hello", "max_tokens": 120, "stream": True, "temperature": 1.0},
    ) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 10
    while (h := httpx.get(f"{server}/health").json())["running"] or h["finished"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["finished"]["cancelled"] == before + 1 and h["running"] == 0 and h["waiting"] == 0


def test_api_key_is_enforced_on_an_adapter_run(keyed_adapter_server, tiny_adapter_run, reference):
    url = keyed_adapter_server
    assert httpx.get(f"{url}/health").status_code == 200  # open for load balancers
    assert _error(httpx.get(f"{url}/v1/models")) == (401, None, "invalid_api_key")
    assert _error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})) == (
        401,
        None,
        "invalid_api_key",
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["my-lora"]
    adapter = load_served(tiny_adapter_run, device="cpu")
    ids = prompt_ids(adapter.tokenizer, adapter.chat_template, MESSAGES)
    r = client.chat.completions.create(model="my-lora", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == _greedy(adapter, ids, 8)[0]
    assert r.choices[0].message.content != _greedy(reference, ids, 8)[0]  # the adapter is really applied


@pytest.mark.integration
def test_32_concurrent_streams_complete_without_errors_in_shared_batches(server):
    import asyncio

    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    before = httpx.get(f"{server}/health").json()

    async def one(i: int) -> tuple[str, str, int]:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"request {i}: apple river stone"}],
            max_tokens=24,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, reason, usage = "", None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
            if c.usage:
                usage = c.usage.completion_tokens
        return text, reason, usage

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)), return_exceptions=True)

    results = asyncio.run(all_of_them())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(reason in ("stop", "length") and 1 <= n <= 24 for _, reason, n in results)
    assert all(n == 24 for _, reason, n in results if reason == "length")  # (a stop token can also be the 24th)
    after = httpx.get(f"{server}/health").json()
    finished = sum(after["finished"].values()) - sum(before["finished"].values())
    steps = after["decode_steps"] - before["decode_steps"]
    assert finished == 32 and after["running"] == 0
    # one at a time this would take about sum(tokens) decode steps; batched it is a small multiple of 24
    assert steps < sum(n for *_, n in results) / 4, (steps, sum(n for *_, n in results))
