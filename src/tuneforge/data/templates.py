"""Chat templates: the built-in ones, choosing one (`data.chat_template`), and rendering rows with the character
spans of their trained turns, from which masks.py makes `input_ids` + `labels` (-100 wherever no loss is taken).

Real chat templates (Llama-3, Qwen2.5, Mistral, Phi-3, ...) have no `{% generation %}` markers, so
`apply_chat_template(return_assistant_tokens_mask=True)` returns an all-zero mask for them. tuneforge renders
each conversation and locates every trained assistant turn in that one rendering (turn_spans.py): the reply and
its end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `</s>`, ...); whitespace after the marker is template
scaffolding and is not trained. When a template closes a turn with no marker at all, the tokenizer's EOS is
written after the reply and trained, so the model learns to stop. Rows with tools and tool calls are rendered
as tool_calls.py and rendering.py say; a template that would drop them, or whose turns cannot be told apart,
is refused before any row is (TemplateChoiceError). docs/chat-templates.md lists what every community
template in ../shared/data/chat_templates does.
"""

from __future__ import annotations

from pathlib import Path

from jinja2.exceptions import TemplateError as JinjaError
from jinja2.exceptions import TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from tuneforge.data.rendering import (
    TemplateChoiceError,
    TemplateError,
    refusal,
    render,
    usable_template,
)
from tuneforge.data.tool_calls import for_template, uses_tools
from tuneforge.data.turn_spans import Chat, Span, assistant_spans_many

__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "TemplateError",
    "TemplateChoiceError",
    "chats_rendered",
    "check_syntax",
    "refusal",
    "render",
    "resolve_template",
]

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
    # ChatML with tools, in the Hermes / Qwen2.5 form: the tools' schemas in the system turn, each call as
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call> in the assistant turn, results as <tool_response> in
    # a user turn. Without tools it writes what `chatml` writes.
    "chatml-tools": (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}"
        "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
        "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
        "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
        "{%- elif messages and messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'system' and loop.first %}"
        "{%- elif m.role == 'assistant' and m.tool_calls %}{{- '<|im_start|>assistant' }}"
        "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
        "{%- for call in m.tool_calls %}{%- set f = call.function if call.function is defined else call %}"
        '{{- \'\\n<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' + (f.arguments | tojson) + '
        "'}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
        "{%- elif m.role == 'tool' %}"
        "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}


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


def chats_rendered(
    tokenizer, template: str, conversations: list[list[dict]], train_on: str, refused: dict[int, str] | None = None
) -> tuple[list[str], list]:
    """(rendered texts, trained spans per text) of many conversations: the Python half of tokenizing chats.

    A template that cannot train these rows at all raises TemplateChoiceError (whatever `refused`): it would drop
    their tools, tool calls or tool results, or it writes text of its own after every conversation. A
    conversation the template refuses (its `raise_exception(...)`, an undefined value, any error in its jinja)
    or whose turns cannot be located raises TemplateError with the reason; or, given `refused`, is rendered as
    "" with no spans and its position in `conversations` -> the message is put in `refused`."""
    traits = usable_template(tokenizer, template, set().union(*map(uses_tools, conversations)))
    chats = [Chat(*for_template(c, traits.arguments or "object")) for c in conversations]
    try:
        rendered = assistant_spans_many(tokenizer, template, chats, train_on, traits.needs_tools)
    except (JinjaError, TemplateError) as e:
        if refused is None:
            if isinstance(e, TemplateError):
                raise
            raise TemplateError(f"the chat template refused a conversation: {refusal(e)}") from None
        rendered = []
        for k, chat in enumerate(chats):  # which ones: one by one
            try:
                rendered.append(assistant_spans_many(tokenizer, template, [chat], train_on, traits.needs_tools)[0])
            except (JinjaError, TemplateError) as e:
                refused[k] = refusal(e)
                rendered.append(("", []))
    closed = [_closed(tokenizer, text, spans) for text, spans in rendered]
    return [text for text, _ in closed], [sp for _, sp in closed]


def _closed(tokenizer, text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """The text with the tokenizer's EOS written right after every trained turn the template closes with nothing
    (trained with it, so that stopping is learned), and the spans moved to match."""
    if all(closed for _, _, closed in spans):
        return text, spans
    eos = tokenizer.eos_token
    if not eos:
        raise TemplateError(
            "the chat template emits no end-of-turn marker after assistant turns and the tokenizer has no "
            "eos_token, so the model could not learn where a turn ends; use data.chat_template: chatml or alpaca"
        )
    pieces, out, last, shift = [], [], 0, 0
    for start, end, has_marker in spans:
        if not has_marker:
            pieces += [text[last:end], eos]
            last = end
        out.append((start + shift, end + shift + (0 if has_marker else len(eos)), True))
        shift += 0 if has_marker else len(eos)
    return "".join([*pieces, text[last:]]), out
