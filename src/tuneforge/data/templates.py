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

from itertools import chain
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


def _direct_renderer(tokenizer, template: str):
    """The compiled jinja template called directly with what apply_chat_template passes it (the messages, no
    tools or documents, the tokenizer's special tokens): the same text for tuneforge's plain string messages,
    without transformers' per-conversation normalisation (60% of rendering time). None if unavailable."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # a transformers without this helper: the public path only
        return None
    special = dict(tokenizer.special_tokens_map)
    return lambda msgs, flag: compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=flag,
                                              **special)


def _render_many(tokenizer, template: str, requests: list[tuple[list[dict], bool]]) -> list[str]:
    """`render` of many (messages, generation_prompt) pairs, the same text without the per-call overhead: the
    template is called directly when its first rendering equals apply_chat_template's, else one batched
    apply_chat_template call per flag. An empty conversation is rendered alone, to fail as alone."""
    out = [""] * len(requests)
    direct = _direct_renderer(tokenizer, template)
    for flag in (False, True):
        idx = [k for k, (msgs, g) in enumerate(requests) if g is flag and msgs]
        if not idx:
            continue
        first = render(tokenizer, template, requests[idx[0]][0], flag)
        if direct is not None and direct(requests[idx[0]][0], flag) == first:
            texts = [first] + [direct(requests[k][0], flag) for k in idx[1:]]
        else:
            texts = tokenizer.apply_chat_template([requests[k][0] for k in idx], chat_template=template,
                                                  tokenize=False, add_generation_prompt=flag)
        for k, text in zip(idx, texts):
            out[k] = text
    for k, (msgs, g) in enumerate(requests):
        if not msgs:
            out[k] = render(tokenizer, template, msgs, g)
    return out


def _render_followed(tokenizer, template: str, conversations: list[list[dict]]) -> list[str | None]:
    """Each conversation followed by a user turn; None where the template refuses a trailing user turn."""
    followed = [([*msgs, {"role": "user", "content": "x"}], False) for msgs in conversations]
    try:
        return list(_render_many(tokenizer, template, followed))
    except Exception:  # some conversation is refused: find which, one by one
        out: list[str | None] = []
        for msgs, _ in followed:
            try:
                out.append(render(tokenizer, template, msgs, False))
            except Exception:
                out.append(None)
        return out


def assistant_spans_many(
    tokenizer: PreTrainedTokenizerBase, template: str, conversations: list[list[dict]], train_on: str
) -> list[tuple[str, list[tuple[int, int, bool]]]]:
    """Render each conversation and return (text, [(start, end, has_end_marker)]) of its trained turns.

    Assistant turn i spans `through[len(before):end]`, where before = the conversation up to turn i with
    the generation prompt, through = the conversation through turn i (the full rendering for the last
    turn), and `end` is where `through` stops agreeing with a rendering in which another message follows.
    """
    requests: list[tuple[list[dict], bool]] = []

    def need(msgs: list[dict], generation_prompt: bool) -> int:
        requests.append((msgs, generation_prompt))
        return len(requests) - 1

    plans, ends_last = [], []
    for msgs in conversations:
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        full = need(msgs, False)
        steps = [(i, need(msgs[:i], True), full if i == len(msgs) - 1 else need(msgs[: i + 1], False)) for i in turns]
        plans.append((full, steps))
        ends_last.append(bool(turns) and turns[-1] == len(msgs) - 1)
    texts = _render_many(tokenizer, template, requests)
    followed = iter(_render_followed(tokenizer, template, [m for m, last in zip(conversations, ends_last) if last]))
    out = []
    for msgs, (full_k, steps), last in zip(conversations, plans, ends_last):
        full, spans = texts[full_k], []
        follow_last = next(followed) if last else None
        for i, before_k, through_k in steps:
            before, through = texts[before_k], texts[through_k]
            end = _turn_end(tokenizer, through, follow_last if i == len(msgs) - 1 else full)
            if not (through.startswith(before) and full.startswith(through[:end])) or end < len(before):
                raise TemplateError(
                    f"the chat template renders assistant turn {i} differently depending on what follows it, so its "
                    "tokens cannot be located; use data.chat_template: chatml (or alpaca), or a template file"
                )
            turn = through[len(before):end].rstrip()
            content = msgs[i]["content"].strip()
            at = turn.find(content) if content else 0
            has_marker = bool(turn[at + len(content):].strip()) if at >= 0 else True
            spans.append((len(before), len(before) + len(turn), has_marker))
        out.append((full, spans))
    return out


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], train_on: str
) -> tuple[str, list[tuple[int, int, bool]]]:
    """Render `messages` and return (text, [(start, end, has_end_marker)]) of the trained turns."""
    return assistant_spans_many(tokenizer, template, [messages], train_on)[0]


def _turn_end(tokenizer, through: str, follow: str | None) -> int:
    """Where an assistant turn ends in `through`: where it stops agreeing, token by token, with `follow`, a
    rendering in which another message follows (some templates close the whole conversation with an extra
    EOS). `follow` is None when the template refuses a following user turn: keep the whole rendering."""
    if follow is None or follow.startswith(through):
        return len(through)
    a = tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)
    b = tokenizer(follow, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a["input_ids"]), len(b)) and a["input_ids"][n] == b[n]:
        n += 1
    return a["offset_mapping"][n - 1][1] if n else 0


def _labels_many(ids: list[list[int]], offsets: list, spans: list[list[tuple[int, int, bool]]], train_on: str) -> list[list[int]]:
    """Labels of many tokenized conversations at once: a token is trained when it overlaps a trained
    character span (numpy over the whole batch)."""
    if train_on == "all":
        return [list(x) for x in ids]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n = int(lengths.sum())
    flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=n)
    off = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * n).reshape(n, 2)
    row = np.repeat(np.arange(len(ids)), lengths)
    trained = np.zeros(n, dtype=bool)
    for k in range(max(map(len, spans), default=0)):  # the k-th trained span of every row; (0, 0) overlaps nothing
        start = np.array([s[k][0] if k < len(s) else 0 for s in spans], dtype=np.int64)[row]
        end = np.array([s[k][1] if k < len(s) else 0 for s in spans], dtype=np.int64)[row]
        trained |= (off[:, 0] < end) & (off[:, 1] > start)
    labels = np.where(trained, flat_ids, IGNORE_INDEX).tolist()
    bounds = [0, *np.cumsum(lengths).tolist()]
    return [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


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


def _encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of many texts, no special tokens added. A fast tokenizer is called
    through its Rust backend directly: the same ids and offsets as `tokenizer(..., return_offsets_mapping=True)`
    without converting every encoding to a Python dict first (a third of the tokenization time)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]


def tokenize_chats(
    tokenizer: PreTrainedTokenizerBase, template: str, conversations: list[list[dict]], train_on: str
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of many conversations (batched rendering and tokenization); -100 outside trained turns."""
    rendered = assistant_spans_many(tokenizer, template, conversations, train_on)
    if not rendered:
        return []
    all_ids, all_offsets = _encode_with_offsets(tokenizer, [text for text, _ in rendered])
    spans = [sp for _, sp in rendered]
    out = []
    for sp, ids, labels in zip(spans, all_ids, _labels_many(all_ids, all_offsets, spans, train_on)):
        ids = list(ids)
        _close_turn(tokenizer, ids, labels, sp, train_on)
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
