"""Render rows with a chat template into `input_ids` + `labels` (-100 wherever no loss is taken).

Real chat templates (Llama-3, Qwen2.5, Mistral, Phi-3, ...) have no `{% generation %}` markers, so
`apply_chat_template(return_assistant_tokens_mask=True)` returns an all-zero mask for them. tuneforge
finds each assistant turn by rendering the conversation prefix twice: up to the turn with the
generation prompt (A) and through the turn (B). `B[len(A):]` is the turn's content plus its
end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `</s>`, ...). Trailing whitespace after the marker is
template scaffolding and is not trained. The full conversation is tokenized once with character
offsets, and a token is trained when it overlaps a trained character span. When a template emits no
end-of-turn marker at all, the tokenizer's EOS is appended and trained, so the model learns to stop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
BUILTIN_TEMPLATES = {
    # Alpaca (Stanford) layout; the default system line is used when a row has none.
    "alpaca": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
        "{% else %}" + ALPACA_SYSTEM + "\n\n{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    # ChatML (OpenAI / Qwen layout).
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


class TemplateError(ValueError):
    """A chat template that cannot be used to locate assistant turns."""


def resolve_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> tuple[str, str]:
    """Return (template source, name). `choice`: auto | alpaca | chatml | path to a .jinja file."""
    if choice == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template, "tokenizer"
        return BUILTIN_TEMPLATES["alpaca"], "alpaca"
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], choice
    path = Path(choice).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    raise TemplateError(
        f"data.chat_template={choice!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}), "
        "'auto', nor an existing .jinja file"
    )


def render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], train_on: str
) -> tuple[str, list[tuple[int, int, bool]]]:
    """Render `messages` and return (text, [(start, end, has_end_marker)]) of the trained turns."""
    full = render(tokenizer, template, messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = render(tokenizer, template, messages[:i], True)
        through = render(tokenizer, template, messages[: i + 1], False)
        end = _turn_end(tokenizer, template, messages, i, through, full)
        if not (through.startswith(before) and full.startswith(through[:end])) or end < len(before):
            raise TemplateError(
                f"the chat template renders assistant turn {i} differently depending on what follows it, so its "
                "tokens cannot be located; use data.chat_template: chatml (or alpaca), or a template file"
            )
        turn = through[len(before):end].rstrip()
        content = messages[i]["content"].strip()
        at = turn.find(content) if content else 0
        has_marker = bool(turn[at + len(content):].strip()) if at >= 0 else True
        spans.append((len(before), len(before) + len(turn), has_marker))
    return full, spans


def _turn_end(tokenizer, template: str, messages: list[dict], i: int, through: str, full: str) -> int:
    """Where assistant turn i ends in `through`: where it stops agreeing, token by token, with a rendering
    in which another message follows (some templates close the whole conversation with an extra EOS)."""
    follow = full
    if i == len(messages) - 1:
        try:
            follow = render(tokenizer, template, [*messages, {"role": "user", "content": "x"}], False)
        except Exception:  # a template that refuses a trailing user turn: keep the whole rendering
            return len(through)
    if follow.startswith(through):
        return len(through)
    a = tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)
    b = tokenizer(follow, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a["input_ids"]), len(b)) and a["input_ids"][n] == b[n]:
        n += 1
    return a["offset_mapping"][n - 1][1] if n else 0


def _labels(ids: list[int], offsets, spans: list[tuple[int, int, bool]], train_on: str) -> list[int]:
    if train_on == "all":
        return list(ids)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    for start, end, _ in spans:  # a token is trained when it overlaps a trained character span
        trained |= (off[:, 0] < end) & (off[:, 1] > start)
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def _close_turn(tokenizer, ids: list[int], labels: list[int], spans, train_on: str) -> None:
    """When the template closes assistant turns with nothing, append a trained EOS so stopping is learned."""
    if not spans or spans[-1][2]:
        return
    if tokenizer.eos_token_id is None:
        raise TemplateError("the chat template emits no end-of-turn marker and the tokenizer has no eos_token")
    if any(not sp[2] for sp in spans[:-1]):
        raise TemplateError(
            "the chat template emits no end-of-turn marker after assistant turns, so the model could not "
            "learn where a turn ends; use data.chat_template: chatml or alpaca"
        )
    end = max(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX) + 1 if train_on != "all" else len(ids)
    ids.insert(end, tokenizer.eos_token_id)
    labels.insert(end, tokenizer.eos_token_id)


def tokenize_chats(
    tokenizer: PreTrainedTokenizerBase, template: str, conversations: list[list[dict]], train_on: str
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of many conversations (one batched tokenizer call); -100 outside trained turns."""
    rendered = [assistant_spans(tokenizer, template, msgs, train_on) for msgs in conversations]
    if not rendered:
        return []
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids = list(ids)
        labels = _labels(ids, offsets, spans, train_on)
        _close_turn(tokenizer, ids, labels, spans, train_on)
        out.append((ids, labels))
    return out


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], train_on: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; labels are -100 outside the trained turns."""
    return tokenize_chats(tokenizer, template, [messages], train_on)[0]


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Raw completion text: every token trained, EOS appended (and trained)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for generation)."""
    text = render(tokenizer, template, messages, True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """Token ids that end an assistant turn under this template (EOS first): the stop tokens for generation."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ids, labels = tokenize_chat(tokenizer, template, probe, "last")
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    added = set(tokenizer.get_added_vocab().values())
    if trained and trained[-1] not in stops and (trained[-1] in tokenizer.all_special_ids or trained[-1] in added):
        stops.append(trained[-1])
    return stops
