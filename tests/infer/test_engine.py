"""The batching engine in-process: batched greedy output equals one-at-a-time `model.generate`, stop strings
never leak, a cancelled sequence leaves the batch at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tuneforge.infer.engine import Engine, Event, SamplingParams, sample
from tuneforge.serve.loading import load_served


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served(tiny_model_dir, device="cpu")


def _reference(served, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """Greedy text and token count from plain `model.generate`, one prompt at a time (the seed's way)."""
    tok = served.tokenizer
    out = served.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=served.stop_token_ids,
        pad_token_id=tok.pad_token_id,
    )
    new = out[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams, stagger_s: float = 0.0) -> list[list[Event]]:
    events: list[list[Event]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(ev: Event) -> None:
            events[i].append(ev)
            if ev.finish_reason:
                done.release()

        return on_event

    for i, p in enumerate(prompts):
        engine.submit(p, params, listener(i))
        time.sleep(stagger_s * (i % 3))  # some arrive while others decode: they join the running batch
    for _ in prompts:
        assert done.acquire(timeout=30)
    return events


def test_batched_greedy_equals_one_at_a_time_generate(served):
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
    engine = Engine(served.model, tok, served.stop_token_ids, served.context_length, max_batch_size=4).start()
    try:
        events = _run(engine, prompts, SamplingParams(max_tokens=24, temperature=0.0), stagger_s=0.004)
    finally:
        engine.stop()
    for p, evs in zip(prompts, events):
        want_text, want_tokens = _reference(served, p, 24)
        assert "".join(e.text for e in evs) == want_text
        assert evs[-1].completion_tokens == want_tokens
        assert evs[-1].finish_reason == ("length" if want_tokens == 24 else "stop")
        assert all(e.finish_reason is None for e in evs[:-1])
    reasons = [e[-1].finish_reason for e in events]
    assert engine.finished == {r: reasons.count(r) for r in set(reasons)}


def test_stop_string_cuts_the_text_and_never_reaches_the_stream(served):
    tok = served.tokenizer
    ids = tok("apple river stone")["input_ids"]
    full, _ = _reference(served, ids, 30)
    stop = full[6:9]  # a stop string inside the greedy continuation (spanning token boundaries or not)
    assert len(stop) == 3 and full.find(stop) >= 0
    engine = Engine(served.model, tok, served.stop_token_ids, served.context_length).start()
    try:
        (evs,) = _run(engine, [ids], SamplingParams(max_tokens=30, temperature=0.0, stop=("never-there", stop)))
    finally:
        engine.stop()
    assert "".join(e.text for e in evs) == full[: full.find(stop)]
    assert evs[-1].finish_reason == "stop"


def test_cancelled_sequence_leaves_the_batch_at_once(served):
    tok = served.tokenizer
    engine = Engine(served.model, tok, set(), served.context_length).start()  # no stop ids: runs to max_tokens
    got: list[Event] = []
    first = threading.Event()
    finished = threading.Event()

    def on_event(ev: Event) -> None:
        got.append(ev)
        first.set()
        if ev.finish_reason:
            finished.set()

    try:
        seq = engine.submit(tok("hello")["input_ids"], SamplingParams(max_tokens=120, temperature=0.0), on_event)
        assert first.wait(10)
        seq.cancel()
        assert finished.wait(10)
        assert engine.running == 0
    finally:
        engine.stop()
    assert got[-1].finish_reason == "cancelled" and got[-1].completion_tokens < 120
    assert engine.finished == {"cancelled": 1}


def test_sampling_rows_follow_their_own_temperature_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    gen = torch.Generator().manual_seed(0)
    # temperature 0 -> argmax; top_p tiny -> only the most likely token survives
    for _ in range(20):
        out = sample(logits, torch.tensor([0.0, 1.0, 2.0, 0.0]), torch.tensor([1.0, 1e-6, 1e-6, 0.5]), gen)
        assert out.tolist() == [1, 1, 1, 1]
    # temperature 1, top_p 1: every token appears
    many = torch.stack([sample(logits[:1], torch.tensor([1.0]), torch.tensor([1.0]), gen) for _ in range(400)])
    assert set(many.flatten().tolist()) == {0, 1, 2, 3}
