"""Token log-probabilities: the engine's values equal log_softmax of a plain forward's logits at every generated
position (rows of different lengths batched together, greedy and sampled), nothing is computed unless asked,
and both endpoints return them in OpenAI's forms (/v1/completions `logprobs: k`, chat `logprobs` +
`top_logprobs`), streamed and not."""

from __future__ import annotations

import threading

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'tuneforge[serve]'")

import tuneforge.infer.engine as engine_module  # noqa: E402
from tuneforge.infer.engine import Engine, SamplingParams  # noqa: E402
from tuneforge.serve.loading import load_served  # noqa: E402

from .conftest import live_server  # noqa: E402

PROMPTS = ["Reverse the order of these words.\n\nrocket candle island", "Sort these words"]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served(tiny_model_dir, device="cpu")


def _reference(served, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over prompt + generated: row j is the distribution of generated[j]."""
    with torch.no_grad():
        logits = served.model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(generated) - 1], -1)


def _greedy(served, prompt: list[int], n: int) -> list[int]:
    """HF generate's greedy tokens (a stop token dropped): what the server generates at temperature 0."""
    out = served.model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=served.stop_token_ids,
        pad_token_id=served.tokenizer.pad_token_id,
    )
    return [t for t in out[0, len(prompt) :].tolist() if t not in served.stop_token_ids]


def _run(served, prompts: list[list[int]], params: SamplingParams) -> list[list]:
    """Each prompt's events, all submitted at once (so they share batches)."""
    engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length, max_batch_size=4)
    events, done = [[] for _ in prompts], threading.Semaphore(0)

    def listener(k):
        def on_event(ev):
            events[k].append(ev)
            if ev.finish_reason:
                done.release()

        return on_event

    engine.start()
    try:
        seqs = [engine.submit(p, params, listener(k)) for k, p in enumerate(prompts)]
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    return list(zip(seqs, events))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_logprobs_equal_log_softmax_of_a_plain_forward(served, temperature):
    tok = served.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])  # left padding in the shared batch
    for (seq, events), prompt in zip(_run(served, prompts, SamplingParams(12, temperature, logprobs=3)), prompts):
        entries = [e for ev in events for e in ev.logprobs]
        generated = [t for t in seq.generated if t not in served.stop_token_ids]
        assert [e[0] for e in entries] == generated and len(generated) >= 3
        ref = _reference(served, prompt, generated)
        for j, (token, lp, top) in enumerate(entries):
            assert lp == pytest.approx(ref[j, token].item(), abs=1e-4)
            values, ids = ref[j].topk(3)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        if temperature == 0:  # greedy: the chosen token is the most likely one
            assert all(token == top[0][0] for token, _, top in entries)


def test_nothing_is_computed_unless_asked(served, monkeypatch):
    def refuse(*_):
        raise AssertionError("token_logprobs ran for a request that did not ask")

    monkeypatch.setattr(engine_module, "token_logprobs", refuse)
    tok = served.tokenizer
    [(seq, events)] = _run(served, [tok(PROMPTS[0])["input_ids"]], SamplingParams(6, 0.0))
    assert len(seq.generated) == 6 and all(ev.logprobs is None for ev in events)


def test_both_endpoints_return_openai_logprobs(served):
    tok = served.tokenizer
    prompt = tok(PROMPTS[0])["input_ids"]
    with live_server(served) as url:
        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "logprobs": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        lp = r["logprobs"]
        generated = _greedy(served, prompt, 8)  # (a random model: tokens may hold parts of UTF-8 characters)
        ref = _reference(served, prompt, generated)
        assert lp["tokens"] == [tok.decode([t]) for t in generated]
        assert lp["token_logprobs"] == pytest.approx([ref[j, t].item() for j, t in enumerate(generated)], abs=1e-4)
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(lp["tokens"]))]
        assert all(
            len(d) <= 2 and max(d.values()) == pytest.approx(lp["token_logprobs"][j], abs=1e-6)
            for j, d in enumerate(lp["top_logprobs"])
        )
        # streamed: the same columns, piece by piece, offsets continuing
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            import json

            pieces = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        streamed = [p["choices"][0]["logprobs"] for p in pieces]
        assert [t for p in streamed for t in p["tokens"]] == lp["tokens"]
        assert [v for p in streamed for v in p["text_offset"]] == lp["text_offset"]
        assert [v for p in streamed for v in p["token_logprobs"]] == pytest.approx(lp["token_logprobs"], abs=1e-6)
        # logprobs=0: the chosen tokens only
        r0 = httpx.post(f"{url}/v1/completions", json={**body, "logprobs": 0}, timeout=60).json()["choices"][0]
        assert r0["logprobs"]["top_logprobs"] is None and r0["logprobs"]["tokens"] == lp["tokens"]

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        c = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
        ).choices[0]
        chat_prompt = tok(
            served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        content = c.logprobs.content
        ids = _greedy(served, chat_prompt, 8)
        assert [e.token for e in content] == [tok.decode([t]) for t in ids]
        ref = _reference(served, chat_prompt, ids)
        assert [e.logprob for e in content] == pytest.approx([ref[j, t].item() for j, t in enumerate(ids)], abs=1e-4)
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob for e in content)
        assert content[0].bytes == list(content[0].token.encode())
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True
            )
        )
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in content]
        plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.message.content
