"""Render rows with a chat template into `input_ids` + `labels` (-100 wherever no loss is taken).

Real chat templates (Llama-3, Qwen2.5, Mistral, Phi-3, ...) have no `{% generation %}` markers, so
`apply_chat_template(return_assistant_tokens_mask=True)` returns an all-zero mask for them. tuneforge
finds each assistant turn by rendering the conversation prefix twice: up to the turn with the
generation prompt (A) and through the turn (B). `B[len(A):]` is the turn's content plus its
end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `</s>`, ...). Trailing whitespace after the marker is
template scaffolding and is not trained. masks.py tokenizes the full conversation once with character
offsets, and a token is trained when it overlaps a trained character span. When a template emits no
end-of-turn marker at all, the tokenizer's EOS is appended and trained, so the model learns to stop.
"""

from __future__ import annotations

from pathlib import Path

from jinja2.exceptions import TemplateError as JinjaError
from jinja2.exceptions import TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from tuneforge.errors import TuneforgeError

IGNORE_INDEX = -100

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
BUILTIN_TEMPLATES = {
    # Alpaca (Stanford) layout; the default system line is used when a row has none.
    "alpaca": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
        "{% else %}" + ALPACA_SYSTEM + "\n\n{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}"
        "{% if not loop.last %}\n\n{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    # ChatML (OpenAI / Qwen layout).
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


class TemplateError(TuneforgeError, ValueError):
    """A chat template that cannot be used to locate assistant turns, or that refuses a conversation."""


def refusal(error: Exception) -> str:
    """What a template said when it refused a conversation (its `raise_exception` message, an undefined value),
    or why its assistant turns cannot be found in this conversation."""
    message = str(getattr(error, "message", None) or error).strip() or type(error).__name__
    return message if type(error) in (JinjaError, TemplateError) else f"{type(error).__name__}: {message}"


def check_syntax(template: str, where: str) -> None:
    """Raise TemplateError naming `where` and the line when the template does not compile."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: rendering will say
        return
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise TemplateError(
            f"{where}, line {e.lineno}: the chat template has a syntax error: {e.message}; fix it, "
            "or set data.chat_template: chatml (or alpaca)"
        ) from None


def resolve_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> tuple[str, str]:
    """Return (template source, name). `choice`: auto | alpaca | chatml | path to a .jinja file."""
    if choice == "auto":
        if getattr(tokenizer, "chat_template", None):
            if isinstance(tokenizer.chat_template, str):
                check_syntax(tokenizer.chat_template, f"the chat template of tokenizer {tokenizer.name_or_path}")
            return tokenizer.chat_template, "tokenizer"
        return BUILTIN_TEMPLATES["alpaca"], "alpaca"
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], choice
    path = Path(choice).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        check_syntax(text, f"{path} (data.chat_template)")
        return text, str(path)
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
        from jinja2.runtime import new_context
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # a transformers or jinja2 without these: the public path only
        return None
    # Template.render(**vars) without its per-call merge of the template globals (a ChainMap) into the
    # variables: the context's variables are built from one pre-merged dict instead (2x faster, same text)
    env, root, blocks, name, globals_ = (
        compiled.environment,
        compiled.root_render_func,
        compiled.blocks,
        compiled.name,
        compiled.globals,
    )
    base = {**dict(globals_), "tools": None, "documents": None, **tokenizer.special_tokens_map}

    def render_direct(msgs: list[dict], flag: bool) -> str:
        variables = {**base, "messages": msgs, "add_generation_prompt": flag}
        return env.concat(root(new_context(env, name, blocks, variables, True, globals_)))

    return render_direct


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
            texts = tokenizer.apply_chat_template(
                [requests[k][0] for k in idx], chat_template=template, tokenize=False, add_generation_prompt=flag
            )
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
            turn = through[len(before) : end].rstrip()
            content = msgs[i]["content"].strip()
            at = turn.find(content) if content else 0
            has_marker = bool(turn[at + len(content) :].strip()) if at >= 0 else True
            spans.append((len(before), len(before) + len(turn), has_marker))
        out.append((full, spans))
    return out


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


def chats_rendered(
    tokenizer, template: str, conversations: list[list[dict]], train_on: str, refused: dict[int, str] | None = None
) -> tuple[list[str], list]:
    """(rendered texts, trained spans per text) of many conversations: the Python half of tokenizing chats.

    A conversation the template refuses (its `raise_exception(...)`, an undefined value, any jinja error) raises
    TemplateError with the template's message; or, given `refused`, is rendered as "" with no spans and its
    position in `conversations` -> the message is put in `refused`."""
    try:
        rendered = assistant_spans_many(tokenizer, template, conversations, train_on)
    except (JinjaError, TemplateError) as e:
        if refused is None:
            if isinstance(e, TemplateError):
                raise
            raise TemplateError(f"the chat template refused a conversation: {refusal(e)}") from None
        rendered = []
        for k, conv in enumerate(conversations):  # which ones: one by one
            try:
                rendered.append(assistant_spans_many(tokenizer, template, [conv], train_on)[0])
            except (JinjaError, TemplateError) as e:
                refused[k] = refusal(e)
                rendered.append(("", []))
    return [text for text, _ in rendered], [sp for _, sp in rendered]
