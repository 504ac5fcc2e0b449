"""What one request may ask of the server, and who may reach it: body size (413), prompts x n (400), prompts refused
by their characters before tokenising, tokenisation off the event loop (/health answers meanwhile), a client
leaving mid-body logged as one line, the bind rule and the docs endpoints behind the key.

The app runs in this process under a real uvicorn on 127.0.0.1 (a thread), so a test can slow the tokenizer down
and read the server's log records."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'tuneforge[serve]'")

from tuneforge.cli import main  # noqa: E402
from tuneforge.infer.engine import Engine  # noqa: E402
from tuneforge.serve.limits import (  # noqa: E402
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SEQUENCES,
    exposure_error,
    is_loopback,
    max_chars_per_token,
)
from tuneforge.serve.loading import load_served  # noqa: E402
from tuneforge.serve.server import create_app  # noqa: E402

from .conftest import CONTEXT, live_server  # noqa: E402

KEY = "sk-limits"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def url(served):
    with live_server(served) as u:
        yield u


def _error(resp) -> tuple[int, str | None, str | None]:
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return resp.status_code, err["param"], err["code"]


# ---------------------------------------------------------------------------- body size and prompts x n
def test_an_oversized_body_is_413_with_an_openai_error(url):
    assert DEFAULT_MAX_REQUEST_BYTES == 4 * 2**20
    big = b'{"prompt": "' + b"a" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    resp = httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert _error(resp) == (413, None, "request_too_large"), resp.text
    assert f"is {len(big)} bytes" in resp.json()["error"]["message"]
    assert "--max-request-bytes" in resp.json()["error"]["message"]

    def chunked():  # no Content-Length: refused while reading
        for _ in range(5):
            yield b"a" * 2**20

    resp = httpx.post(f"{url}/v1/chat/completions", content=chunked(), timeout=30)
    assert _error(resp) == (413, None, "request_too_large")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_too_many_sequences_is_400_before_any_tokenising(url):
    assert DEFAULT_MAX_SEQUENCES == 256
    comp = f"{url}/v1/completions"
    flood = httpx.post(comp, json={"prompt": ["apple river stone"] * 2000, "n": 16, "max_tokens": 1}, timeout=30)
    assert _error(flood) == (400, "n", "too_many_sequences"), flood.text
    assert flood.json()["error"]["message"].startswith("this request asks for 32000 sequences (2000 prompt(s) x n=16)")
    assert "--max-sequences-per-request" in flood.json()["error"]["message"]
    ids_flood = httpx.post(comp, json={"prompt": [[5, 6]] * 257, "max_tokens": 1})
    assert _error(ids_flood) == (400, "n", "too_many_sequences")
    ok = httpx.post(comp, json={"prompt": ["x"] * 16, "n": 16, "max_tokens": 1, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 256  # exactly at the cap


def test_the_limits_follow_the_serve_flags(tiny_model_dir, monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(tiny_model_dir), "--max-request-bytes", "300", "--max-sequences-per-request", "4"]) == 0
    assert "requests up to 300 bytes and 4 sequences" in capsys.readouterr().out
    with TestClient(apps[0]) as client:
        r = client.post("/v1/completions", json={"prompt": "a" * 300})
        assert _error(r) == (413, None, "request_too_large") and "at most 300 bytes" in r.json()["error"]["message"]
        assert _error(client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 3})) == (
            400,
            "n",
            "too_many_sequences",
        )
        assert _error(
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 5})
        ) == (400, "n", "too_many_sequences")
        assert client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1}).status_code == 200
    assert main(["serve", str(tiny_model_dir), "--max-sequences-per-request", "0"]) == 2
    assert "--max-sequences-per-request must be at least 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------- prompt length, off the event loop
def test_a_prompt_too_long_in_characters_is_refused_without_tokenising(url, served):
    per_token = max_chars_per_token(served.tokenizer)  # byte-level BPE, no normalizer: the longest token
    assert per_token == max(len(t) for t in served.tokenizer.get_vocab())
    huge = "apple " * 500_000  # 3 MB
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": huge}, timeout=30)
    assert _error(r) == (400, "prompt", "context_length_exceeded")
    assert f"the prompt has {len(huge)} characters" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}]}, timeout=30)
    assert _error(r) == (400, "messages", "context_length_exceeded")
    assert time.perf_counter() - t0 < 20  # tokenising 3 MB twice would take seconds; this is mostly JSON


def test_the_character_bound_holds_only_where_it_is_provable(served):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = served.tokenizer
    per_token = max_chars_per_token(tok)
    for text in ["apple river stone", "a" * 500, " " * 300, "é 中文 🙂" * 40, "<|im_start|>" * 20]:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= len(text) / per_token
    # a normalizer that can shorten text (NFC composes, Strip drops) or a pre-tokenizer that drops whitespace:
    # no shortcut
    for normalizer, pre in [
        (normalizers.NFC(), None),
        (None, pre_tokenizers.Whitespace()),
        (normalizers.Sequence([normalizers.Strip()]), None),
    ]:
        other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()))
        if normalizer is not None:
            other.backend_tokenizer.normalizer = normalizer
        if pre is not None:
            other.backend_tokenizer.pre_tokenizer = pre
        assert max_chars_per_token(other) is None


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_prompt_is_being_tokenised(url, served, route, monkeypatch):
    """A tokenizer call that blocks until released: /health must answer meanwhile (on the event loop it could not)."""
    cls = type(served.tokenizer)
    original = cls.__call__
    entered, release = threading.Event(), threading.Event()

    def slow_call(self, text, *args, **kwargs):
        if isinstance(text, str) and "SLOWTOKENS" in text:
            entered.set()
            release.wait(timeout=30)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", slow_call)
    body = (
        {"prompt": "apple SLOWTOKENS river", "max_tokens": 2}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "apple SLOWTOKENS river"}], "max_tokens": 2}
    )
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}{route}", json=body, timeout=60)))
    worker.start()
    try:
        assert entered.wait(timeout=30), "the request never reached the tokenizer"
        t0 = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=10)  # blocked for 30 s if tokenising ran on the event loop
        assert health.status_code == 200 and time.perf_counter() - t0 < 5
        assert worker.is_alive()  # the request is still being tokenised
    finally:
        release.set()
        worker.join(timeout=60)
    assert result["r"].status_code == 200, result["r"].text


# ---------------------------------------------------------------------------- disconnects
def test_a_client_leaving_mid_body_is_one_log_line_not_a_traceback(url, caplog):
    port = int(url.rsplit(":", 1)[1])
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"messages": ['
        )
        time.sleep(0.3)  # the handler is waiting for the rest of the body
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if "disconnected" in r.getMessage()]:
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    time.sleep(0.3)  # anything logged after it (a traceback) arrives now
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "after 14 of 1000 body bytes of POST /v1/chat/completions; request dropped" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI application" in r.getMessage()]
    assert httpx.get(f"{url}/health").status_code == 200


# ---------------------------------------------------------------------------- who may reach it
def test_loopback_addresses():
    for host in ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "example.com", "my-host"]:
        assert not is_loopback(host), host
    assert exposure_error("127.0.0.1", None, False) is None
    assert exposure_error("0.0.0.0", "k", False) is None and exposure_error("0.0.0.0", None, True) is None


def test_binding_beyond_loopback_needs_a_key_or_the_flag(tiny_model_dir, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    for host in ["0.0.0.0", "::", "192.168.1.20"]:
        assert main(["serve", str(tiny_model_dir), "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"refusing to serve on --host {host} without an API key" in err
        assert "--api-key KEY" in err and "TUNEFORGE_API_KEY" in err and "--allow-unauthenticated" in err
    assert calls == []

    assert main(["serve", str(tiny_model_dir), "--host", "0.0.0.0", "--api-key", KEY]) == 0
    assert main(["serve", str(tiny_model_dir), "--host", "0.0.0.0", "--allow-unauthenticated"]) == 0
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().out
    monkeypatch.setenv("TUNEFORGE_API_KEY", KEY)
    assert main(["serve", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    monkeypatch.delenv("TUNEFORGE_API_KEY")
    assert main(["serve", str(tiny_model_dir), "--host", "127.0.0.1"]) == 0
    assert main(["serve", str(tiny_model_dir), "--host", "localhost"]) == 0
    assert [kw["host"] for kw in calls] == ["0.0.0.0", "0.0.0.0", "0.0.0.0", "127.0.0.1", "localhost"]

    from tuneforge.serve.server import run_server

    with pytest.raises(ValueError, match="refusing to serve on --host 0.0.0.0"):
        run_server(load_served(tiny_model_dir, device="cpu"), host="0.0.0.0")


def test_the_docs_endpoints_follow_the_key(served):
    from fastapi.testclient import TestClient

    def app(api_key):
        engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length)
        engine.start()
        return create_app(served, engine, api_key)

    with TestClient(app(KEY)) as client:
        for path in ["/openapi.json", "/docs", "/redoc"]:
            assert _error(client.get(path)) == (401, None, "invalid_api_key"), path
            assert _error(client.get(path, headers={"Authorization": "Bearer wrong"})) == (401, None, "invalid_api_key")
            assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert "/v1/chat/completions" in spec["paths"] and "/openapi.json" not in spec["paths"]
        assert client.get("/health").status_code == 200  # open for load balancers
    with TestClient(app(None)) as client:  # no key (127.0.0.1 by default): open as before
        assert all(client.get(p).status_code == 200 for p in ["/openapi.json", "/docs", "/redoc"])


def test_models_retrieve_with_the_openai_client(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "tuneforge")
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist; this server serves 'tiny'"):
        client.models.retrieve("gpt-4")
    assert _error(httpx.get(f"{url}/v1/models/org/other")) == (404, "model", "model_not_found")
    assert CONTEXT == client.models.list().data[0].max_model_len
