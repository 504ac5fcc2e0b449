"""`tuneforge serve` options: --max-kv-tokens (a KV-cache budget that holds requests back, outputs unchanged)
and --compile (torch.compile'd forward: eager's greedy outputs, clear errors when it cannot compile)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tuneforge.cli import main
from tuneforge.infer.engine import Engine, Event, SamplingParams
from tuneforge.serve.loading import kv_bytes_per_token, load_served

PROMPTS = [list(range(5 + i, 15 + i)) for i in range(8)]  # 8 prompts of 10 tokens


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served(tiny_model_dir, device="cpu")


def _generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy texts for prompts all submitted before the engine starts (so they arrive together)."""
    texts = [""] * len(prompts)
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(ev: Event) -> None:
            texts[i] += ev.text
            if ev.finish_reason:
                done.release()

        return on_event

    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0), listener(i))
    engine.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    return texts


def test_kv_budget_holds_requests_back_and_keeps_the_outputs(served):
    # no stop ids: every row runs its 20 tokens; a row reserves 10 + 20 = 30 positions, so 128 admits 4 rows
    free = Engine(served.model, served.tokenizer, set(), served.context_length)
    want = _generate(free, PROMPTS, 20)
    assert (free.peak_running, free.peak_kv_tokens, free.steps) == (8, 8 * 29, 19)

    budget = Engine(served.model, served.tokenizer, set(), served.context_length, max_kv_tokens=128)
    assert _generate(budget, PROMPTS, 20) == want
    # two waves of 4: the cache peaks at 4 rows x (10 prompt + 19 fed back) positions, never above 128
    assert (budget.peak_running, budget.peak_kv_tokens, budget.steps) == (4, 4 * 29, 38)
    assert free.finished == budget.finished == {"length": 8} and budget.queued == 0 and budget.kv_tokens == 0

    with pytest.raises(ValueError, match=r"max_kv_tokens 100 is less than the model's context \(128 tokens\)"):
        Engine(served.model, served.tokenizer, set(), served.context_length, max_kv_tokens=100)


def test_serve_refuses_a_kv_budget_below_the_context(tiny_model_dir, capsys):
    assert main(["serve", str(tiny_model_dir), "--max-kv-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "--max-kv-tokens 64 is less than the model's context (128 tokens" in err and "use at least 128" in err


def test_serve_options_reach_the_engine_and_health(tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(tiny_model_dir), "--max-kv-tokens", "256", "--max-batch-size", "3"]) == 0
    out = capsys.readouterr().out
    # 2 layers x (key + value) x 4 heads x 16 dims x 4 bytes = 1 KiB per position
    assert "KV cache at most 256 tokens (0.2 MiB)" in out and "batches of up to 3" in out
    with TestClient(apps[0]) as client:  # the lifespan stops the engine on exit
        r = client.post("/v1/completions", json={"prompt": "apple river stone", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while (health := client.get("/health").json())["kv_cache_tokens"]:  # the row leaves just after answering
            assert time.monotonic() < deadline, health
            time.sleep(0.01)
    assert health["max_kv_tokens"] == 256 and health["max_batch_size"] == 3
    assert health["peak_kv_cache_tokens"] >= r.json()["usage"]["prompt_tokens"] and health["waiting"] == 0


def test_kv_bytes_per_token_counts_grouped_query_heads():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    assert kv_bytes_per_token(model) == 3 * 2 * 2 * 8 * 4
    assert kv_bytes_per_token(model.to(torch.bfloat16)) == 3 * 2 * 2 * 8 * 2


# ---------------------------------------------------------------------------- --compile
def test_compile_unavailable_is_a_clear_error(tiny_model_dir, monkeypatch, capsys):
    import torch._dynamo
    import uvicorn

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["serve", str(tiny_model_dir), "--compile"]) == 1
    err = capsys.readouterr().err
    assert "--compile: torch.compile is not supported with this Python/torch" in err
    assert "run without --compile" in err


def test_a_compile_failure_at_warm_up_stops_startup_with_the_reason(tiny_model_dir, monkeypatch, capsys):
    import uvicorn

    def broken_compile(model, **kwargs):  # what a machine without a C++ compiler gives on the first call
        def compiled(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["serve", str(tiny_model_dir), "--compile"]) == 1
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed on this machine: RuntimeError: InvalidCxxCompiler" in err
    assert "Run without --compile" in err and "apt-get install g++" in err


@pytest.mark.integration
def test_compiled_engine_gives_eager_greedy_outputs(served):
    from tuneforge.serve.compile import compile_decode, warm_up

    tok = served.tokenizer
    texts = [
        "Reverse the order of these words.\n\nrocket candle island",
        "hi",
        "apple river stone cloud tiger lamp",
        "Sort these words alphabetically.",
        "window",
        "x y z",
        "marble shadow winter button castle",
        "7 + 5",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    eager = _generate(
        Engine(served.model, tok, served.stop_token_ids, served.context_length, max_batch_size=4), prompts, 24
    )

    engine = Engine(served.model, tok, served.stop_token_ids, served.context_length, max_batch_size=4)
    compile_decode(engine)
    assert engine.decode_model is not served.model
    engine.start()
    try:
        assert warm_up(engine) > 0
        assert engine.finished == {} and engine.steps == 0  # the warm-up is not counted
    finally:
        engine.stop()
    compiled = engine.decode_model
    engine = Engine(served.model, tok, served.stop_token_ids, served.context_length, max_batch_size=4)
    engine.decode_model = compiled
    assert _generate(engine, prompts, 24) == eager  # batches of 4, rows leaving and joining
