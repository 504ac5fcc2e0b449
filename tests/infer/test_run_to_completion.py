"""The engine driven synchronously (`Engine.run_to_completion`, what evaluation uses): greedy tokens equal HF
`model.generate`'s for prompts of different lengths joining and leaving the batch, the forward calls depend only on
the prompts (sharded models need every rank to make the same ones), progress counts, failures raise."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.infer.engine import CACHE_ARG, Engine, SamplingParams

TEXTS = [
    "Reverse the order of these words.\n\nrocket candle island",
    "hi",
    "apple river stone cloud tiger lamp",
    "Sort these words alphabetically.",
    "window",
    "x y z",
    "marble shadow winter button castle",
    "7 + 5",
    "one two",
]
NEW = 20


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny random-init 2-layer Llama (fp32) and its tokenizer, and prompts of 1 to 11 tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) >= 5
    return model, tok, prompts


@pytest.fixture(scope="module")
def reference(tiny) -> tuple[list[int], list[list[int]]]:
    """Stop ids that end rows at different steps (eos plus two tokens the model does emit: a random model seldom
    emits eos), and each prompt's greedy tokens from HF `model.generate` with them."""
    model, tok, prompts = tiny
    free = [hf_one(model, tok, p, [tok.eos_token_id]) for p in prompts]
    stops = [tok.eos_token_id, free[4][1], free[5][4]]
    return stops, [hf_one(model, tok, p, stops) for p in prompts]


def hf_one(model, tok, ids: list[int], stops: list[int]) -> list[int]:
    """Plain greedy `model.generate` on one unpadded prompt: the new tokens up to and including a stop id."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def hf_batch(model, tok, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    """Greedy `model.generate` on all prompts as one left-padded batch (evaluation's path before the engine)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
    )
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])  # HF pads a finished row to the batch's length
    return rows


def test_greedy_tokens_equal_hf_generate_with_rows_joining_and_leaving(tiny, reference):
    model, tok, prompts = tiny
    stops, want = reference
    lengths = sorted(len(w) for w in want)
    assert lengths[0] <= 5 and lengths[-1] == NEW and len(set(lengths)) >= 4  # rows do finish at different steps
    assert hf_batch(model, tok, prompts, stops) == want  # the old left-padded batch agrees too

    engine = Engine(model, tok, stops, context_length=128, max_batch_size=3)
    finished: list[int] = []
    got = engine.run_to_completion(prompts, SamplingParams(max_tokens=NEW, temperature=0.0), finished.append)
    assert got == want
    assert sum(finished) == len(prompts) and len(finished) >= 4  # progress as rows finish, not at the end
    assert engine.finished == {
        "stop": sum(w[-1] in stops for w in want),
        "length": sum(w[-1] not in stops for w in want),
    }
    assert engine.peak_running == 3 and engine.running == 0 and engine.kv_tokens == 0  # nothing kept afterwards


def test_forward_calls_depend_only_on_the_prompts(tiny, reference):
    """What FSDP2 / ZeRO-3 need: two runs (two ranks) over the same prompts make the same forward calls, prefills
    computing the LM head on the last position only."""
    model, tok, prompts = tiny
    stops, _ = reference
    runs = []
    for _ in range(2):
        calls: list[tuple] = []  # (prefill?, input shape, logits shape)

        def before(m, args, kw, calls=calls):
            calls.append((kw[CACHE_ARG].get_seq_length() == 0, tuple(kw["input_ids"].shape)))

        def after(m, args, kw, out, calls=calls):
            calls[-1] = (*calls[-1], tuple(out.logits.shape))

        hooks = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            Engine(model, tok, stops, 128, max_batch_size=3).run_to_completion(
                prompts, SamplingParams(max_tokens=NEW, temperature=0.0)
            )
        finally:
            for h in hooks:
                h.remove()
        runs.append(calls)
    assert runs[0] == runs[1]
    prefills = [c for c in runs[0] if c[0]]
    assert sum(shape[0] for _, shape, _ in prefills) == len(prompts)  # each prompt prefilled once
    # more prefills than static batches of 3 would make: waiting prompts joined the running batch as rows finished
    assert len(prefills) > len(prompts) // 3
    assert all(logits[1] == 1 for _, _, logits in prefills)  # logits_to_keep=1: no prompt x vocabulary logits
    assert max(shape[0] for _, shape, _ in runs[0]) == 3


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(tiny):
    model, tok, prompts = tiny
    greedy = Engine(model, tok, [], 128).run_to_completion(prompts, SamplingParams(NEW, temperature=0.0))
    hot = SamplingParams(NEW, temperature=1.5)
    a = Engine(model, tok, [], 128, seed=7).run_to_completion(prompts, hot)
    b = Engine(model, tok, [], 128, seed=7).run_to_completion(prompts, hot)
    c = Engine(model, tok, [], 128, seed=8).run_to_completion(prompts, hot)
    assert a == b and a != c and a != greedy
    assert all(len(x) == NEW for x in a)  # no stop ids: every row runs to max_tokens
    nucleus_of_one = SamplingParams(NEW, temperature=1.5, top_p=1e-6)
    assert Engine(model, tok, [], 128).run_to_completion(prompts, nucleus_of_one) == greedy


def test_the_context_ends_a_row(tiny):
    model, tok, prompts = tiny
    (out,) = Engine(model, tok, [], context_length=len(prompts[0]) + 5).run_to_completion(
        [prompts[0]], SamplingParams(NEW, temperature=0.0)
    )
    assert len(out) == 5


def test_a_failed_forward_raises_and_leaves_the_engine_empty(tiny):
    model, tok, prompts = tiny
    engine = Engine(model, tok, [tok.eos_token_id], 128, max_batch_size=2)
    boom = model.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.run_to_completion(prompts, SamplingParams(4, temperature=0.0))
    finally:
        boom.remove()
    assert engine.running == 0 and engine.cache is None
    assert engine.run_to_completion(prompts[:1], SamplingParams(4, temperature=0.0)) == [
        hf_one(model, tok, prompts[0], [tok.eos_token_id])[:4]
    ]


def test_not_while_the_serving_thread_runs(tiny):
    model, tok, prompts = tiny
    engine = Engine(model, tok, [], 128).start()
    try:
        with pytest.raises(RuntimeError, match="serving thread is running; stop"):
            engine.run_to_completion(prompts, SamplingParams(4))
    finally:
        engine.stop()


def test_a_seeded_sequence_samples_the_same_alone_or_beside_others(tiny):
    """SamplingParams.seed: the row's own stream (GRPO's rollouts on several processes): the same tokens whatever
    rows run beside it, in which order, and at which batch size; different seeds differ; unseeded rows still
    follow the engine's seed."""
    model, tok, prompts = tiny
    hot = dict(max_tokens=NEW, temperature=1.0, top_p=0.9)

    def run(ps, seeds, batch, engine_seed=0):
        engine = Engine(model, tok, [tok.eos_token_id], 128, max_batch_size=batch, seed=engine_seed)
        return engine.run_to_completion(ps, [SamplingParams(**hot, seed=s) for s in seeds])

    alone = [run([prompts[i]], [100 + i], 1)[0] for i in (0, 2, 6)]
    together = run([prompts[6], prompts[1], prompts[0], prompts[2]], [106, 7, 100, 102], 4, engine_seed=5)
    assert [together[2], together[3], together[0]] == alone
    assert run([prompts[0], prompts[2], prompts[6]], [100, 102, 106], 2, engine_seed=9) == alone
    assert len({tuple(x) for x in alone}) == 3 and all(len(x) == NEW for x in alone)
    assert run([prompts[0]], [101], 1)[0] != alone[0]
    unseeded = [SamplingParams(**hot)] * 2
    first = Engine(model, tok, [tok.eos_token_id], 128, max_batch_size=2, seed=3).run_to_completion(
        prompts[:2], unseeded
    )
    again = Engine(model, tok, [tok.eos_token_id], 128, max_batch_size=2, seed=3).run_to_completion(
        prompts[:2], unseeded
    )
    assert first == again
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        Engine(model, tok, [], 128).run_to_completion(prompts[:1], unseeded)


def test_a_prompt_admitted_several_times_is_prefilled_once(tiny, monkeypatch):
    """GRPO's G completions of one prompt: the prefill runs each distinct prompt once and copies its cache row; each
    copy samples what it samples alone, and greedy copies equal HF generate's tokens."""
    model, tok, prompts = tiny
    hot = dict(max_tokens=NEW, temperature=1.0, top_p=0.9)
    rows = []
    real = Engine._forward

    def counting(self, ids, mask, positions, cache, model=None, **kw):
        rows.append(tuple(ids.shape))
        return real(self, ids, mask, positions, cache, model, **kw)

    monkeypatch.setattr(Engine, "_forward", counting)
    group = [prompts[0], prompts[6], prompts[0], prompts[0], prompts[6]]
    seeds = [10, 11, 12, 13, 14]
    together = Engine(model, tok, [tok.eos_token_id], 128, max_batch_size=5).run_to_completion(
        group, [SamplingParams(**hot, seed=s) for s in seeds]
    )
    assert rows[0] == (2, max(len(prompts[0]), len(prompts[6])))  # two distinct prompts in the prefill
    assert all(r[0] == 5 and r[1] == 1 for r in rows[1:])  # then five rows per decode step
    alone = [
        Engine(model, tok, [tok.eos_token_id], 128).run_to_completion([p], SamplingParams(**hot, seed=s))[0]
        for p, s in zip(group, seeds)
    ]
    assert together == alone and len({tuple(x) for x in together}) == 5
    greedy = Engine(model, tok, [], 128, max_batch_size=4).run_to_completion([prompts[2]] * 3, SamplingParams(NEW, 0.0))
    want = model.generate(torch.tensor([prompts[2]]), max_new_tokens=NEW, do_sample=False)[0, len(prompts[2]) :]
    assert greedy == [want.tolist()] * 3
