"""eval's generate() on the infer engine: the texts of HF `model.generate` (greedy), progress counts, the
model's training mode kept, and LoRA (peft) models generating with their adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.data.masks import prompt_ids
from tuneforge.eval.generation import generate

QUESTIONS = [
    "Reverse the order of these words.\n\nrocket candle island",
    "hi",
    "apple river stone cloud tiger lamp",
    "Sort these words alphabetically.",
    "window",
    "marble shadow winter button castle",
    "7 + 5",
]
NEW = 12


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return model, tok, convs


def hf_answers(model, tok, convs, stops: list[int]) -> tuple[list[str], list[int]]:
    """Texts (stop token dropped, specials skipped, stripped) and token counts of greedy `model.generate`, one
    conversation at a time."""
    texts, counts = [], []
    for c in convs:
        ids = prompt_ids(tok, tok.chat_template, c)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        counts.append(len(new))
        texts.append(tok.decode(new[:-1] if new[-1] in stops else new, skip_special_tokens=True).strip())
    return texts, counts


def frequent_token(model, tok, convs) -> int:
    """The third token the model emits for the first conversation: as a stop id it ends rows early (a random
    model seldom emits eos), and its text must not reach the answer."""
    ids = prompt_ids(tok, tok.chat_template, convs[0])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    return int(out[0, len(ids) + 2])


def test_greedy_texts_equal_hf_generate_and_progress_counts_every_conversation(tiny):
    model, tok, convs = tiny
    model.eval()
    stops = [tok.eos_token_id, frequent_token(model, tok, convs)]
    want, counts = hf_answers(model, tok, convs, stops)
    assert min(counts) < NEW and max(counts) == NEW  # some rows stop early, some run to the limit
    progress: list[int] = []
    got = generate(model, tok, convs, max_new_tokens=NEW, stop_ids=stops, batch_size=3, on_batch=progress.append)
    assert got == want
    assert sum(progress) == len(convs) and len(progress) >= 2


def test_a_training_model_generates_in_eval_mode_and_goes_back_to_training(tiny):
    model, tok, convs = tiny
    seen: list[bool] = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(m.training))
    model.train()
    try:
        generate(model, tok, convs[:2], max_new_tokens=3)
    finally:
        hook.remove()
        model.eval()
    assert seen and not any(seen)  # dropout off while generating
    model.train()
    generate(model, tok, convs[:1], max_new_tokens=2)
    assert model.training and model.model.layers[0].training
    model.eval()
    generate(model, tok, convs[:1], max_new_tokens=2)
    assert not model.training


def test_sampled_generation_is_reproducible_and_differs_from_greedy(tiny):
    model, tok, convs = tiny
    model.eval()
    greedy = generate(model, tok, convs, max_new_tokens=NEW, stop_ids=[tok.eos_token_id])
    hot = [generate(model, tok, convs, max_new_tokens=NEW, temperature=1.5, top_p=0.95) for _ in range(2)]
    assert hot[0] == hot[1] and hot[0] != greedy


def test_a_lora_model_generates_with_its_adapter(tiny_model_dir, tiny):
    from peft import LoraConfig, get_peft_model

    _, tok, convs = tiny
    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.train()  # as in training, where the recipe evaluates before and after
    stops = [tok.eos_token_id]
    got = generate(lora, tok, convs[:4], max_new_tokens=NEW, stop_ids=stops, batch_size=2)
    assert lora.training
    lora.eval()
    assert got == hf_answers(lora, tok, convs[:4], stops)[0]
    with lora.disable_adapter():
        base = generate(lora, tok, convs[:4], max_new_tokens=NEW, stop_ids=stops)
    assert base != got  # the adapter was on
