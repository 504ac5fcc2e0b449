"""Loss masks on awkward conversations, with every real tokenizer in ../shared/data/tokenizers and its own chat
template (or, for the two without one, a template of their family): replies that start or end with whitespace,
a reply whose text is also in the user turn, replies made of role words, an empty system message, text beyond
ASCII, tool calls. Each reply's trained tokens must decode to the reply as the template writes it and its
end-of-turn marker, nothing else (whitespace at the edges compared loosely: tokenizers join a leading space to the
first word, Phi-3's role tokens take it in), through both ways labels are found (every token's offsets, and
bisection over the Rust encodings)."""

from __future__ import annotations

import functools

import pytest
from transformers import AutoTokenizer

from tests.conftest import shared_path
from tests.data.helpers import CALL, TOOLS
from tuneforge.data import encode
from tuneforge.data.masks import tokenize_chat, tokenize_chats
from tuneforge.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, resolve_template
from tuneforge.data.tool_calls import calls_text, tools_message

# tokenizer -> (its chat template: "auto" = its own, else a built-in name or a shared template file; whether the
# template trims replies; its end-of-turn marker; a template of it that renders tool calls, that template's trained
# call and end-of-turn marker)
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HERMES_CALL = f"<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>"
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
TOKENIZERS = {
    "gpt2": ("chatml", False, "<|im_end|>", "chatml-tools", HERMES_CALL, "<|im_end|>"),
    "llama2": ("chujiezheng-llama-2-chat", True, " </s>", "chatml-tools", HERMES_CALL, "<|im_end|>"),
    "llama3": ("auto", True, "<|eot_id|>", "auto", LLAMA_CALL, "<|eot_id|>"),
    "mistral-7b-v0.1": ("auto", False, "</s>", "chatml-tools", HERMES_CALL, "<|im_end|>"),
    "phi-3-mini": ("auto", False, "<|end|>", "chatml-tools", HERMES_CALL, "<|im_end|>"),
    "qwen2.5": ("auto", False, "<|im_end|>", "auto", HERMES_CALL, "<|im_end|>"),
}
U = {"role": "user", "content": "Greet me."}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


CASES = {
    "reply starts with spaces": [U, reply("  Hello there")],
    "reply starts with newlines": [U, reply("\n\nHello there")],
    "reply ends with spaces": [U, reply("Hello there  ")],
    "reply ends with newlines": [U, reply("Hello there\n\n")],
    "reply is in the user turn": [
        {"role": "user", "content": "Repeat after me: the answer is 42"},
        reply("the answer is 42"),
        {"role": "user", "content": "Again: the answer is 42"},
        reply("the answer is 42"),
    ],
    "role words": [
        {"role": "user", "content": "Who are you, assistant?"},
        reply("I am the assistant; you are the user."),
        {"role": "user", "content": "user"},
        reply("assistant"),
    ],
    "empty system message": [{"role": "system", "content": ""}, U, reply("Hello there")],
    "beyond ASCII": [{"role": "user", "content": "Wie heißt 東京 auf Französisch?"}, reply("« Tokyo », ça va 🙂")],
}
TOOL_CASE = [
    tools_message(TOOLS),
    {"role": "user", "content": "Weather in Paris, assistant?"},
    {"role": "assistant", "content": "", "tool_calls": calls_text(CALL)},
    {"role": "tool", "content": "22 C, sunny; the user will like it"},
    reply("It is 22 C and sunny."),
]


@functools.cache
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(str(shared_path(f"tokenizers/{name}")))


def template_of(tok, choice: str) -> str:
    if choice == "auto" or choice in BUILTIN_TEMPLATES:
        return resolve_template(tok, choice)[0]
    return shared_path(f"chat_templates/{choice}.jinja").read_text(encoding="utf-8")


def trained_texts(tok, ids: list[int], labels: list[int]) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    return [tok.decode(r).strip() for r in [*runs, *([cur] if cur else [])]]


def expected(messages: list[dict], trims: bool, marker: str) -> list[str]:
    return [
        ((m["content"].strip() if trims else m["content"]) + marker).strip()
        for m in messages
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_awkward_replies_train_exactly_their_text_and_end_of_turn(name):
    choice, trims, marker, *_ = TOKENIZERS[name]
    tok = tokenizer(name)
    template = template_of(tok, choice)
    conversations = list(CASES.values())
    by_offsets = tokenize_chats(tok, template, conversations, "assistant")
    chunks = [(conversations, [""] * len(conversations))] * 2  # the second chunk is labelled by bisection
    by_search = encode.tokenize_rows(tok, template, chunks, "assistant").rows()[len(conversations) :]
    for case, msgs, (ids, labels), searched in zip(CASES, conversations, by_offsets, by_search):
        assert searched == (ids, labels), case
        assert trained_texts(tok, ids, labels) == expected(msgs, trims, marker), case
    # the prompt of the repeated reply is untrained: its user turns keep "the answer is 42" out of the loss
    ids, labels = by_offsets[list(CASES).index("reply is in the user turn")]
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "Repeat after me: the answer is 42" in untrained and "Again: the answer is 42" in untrained


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_tool_calls_are_trained_and_tool_results_are_not(name):
    *_, choice, call, marker = TOKENIZERS[name]
    tok = tokenizer(name)
    ids, labels = tokenize_chat(tok, template_of(tok, choice), TOOL_CASE, "assistant")
    assert trained_texts(tok, ids, labels) == [call, f"It is 22 C and sunny.{marker}"]
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "22 C, sunny; the user will like it" in untrained and "The weather in a city" in untrained


def test_phi3_role_token_is_not_trained_when_the_reply_starts_with_whitespace():
    """Phi-3's `<|assistant|>` takes in the whitespace after it (rstrip): its offsets then overlap a reply that
    starts with whitespace, and it was trained (the model learnt to write its own role marker)."""
    tok = tokenizer("phi-3-mini")
    template = template_of(tok, "auto")
    msgs = [U, reply("  Hello there")]
    role = tok.convert_tokens_to_ids("<|assistant|>")
    for ids, labels in [
        tokenize_chat(tok, template, msgs, "assistant"),
        encode.tokenize_rows(tok, template, [([msgs, msgs], ["", ""])], "assistant").rows()[1],  # bisection
    ]:
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert role in ids and role not in trained
        assert tok.decode(trained) == "Hello there<|end|>"
