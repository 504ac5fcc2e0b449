"""Render conversations with a chat template, one or many at a time, tools included; what a template does.

Messages go to the template as `tool_calls.for_template` shapes them (plain `{role, content}`, calls, results)
and a row's tools as `tools=`. Templates differ in how they want a call's arguments: most write them with
`| tojson` (an object), some join them into text with `+` (JSON text: functionary, Mistral's). `template_traits`
renders probe conversations once per template to learn which, whether the template renders tools, calls and
results at all (one that ignores them would drop them from training rows without a word), whether it renders at
all without tools (the tool-use-only templates iterate over `tools`: rows without tools get an empty list), and
whether it can train at all: a template that writes text of its own after every conversation (an instruction
turn, the assistant's header) leaves no way to tell where a turn ends, and one that needs variables
apply_chat_template does not pass renders nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError as JinjaError
from jinja2.exceptions import UndefinedError
from transformers import PreTrainedTokenizerBase

from tuneforge.data.tool_calls import for_template, uses_tools
from tuneforge.errors import InputError, TuneforgeError

# a template that renders tool calls in the Hermes / Qwen2.5 form (`<tool_call>{"name", "arguments"}</tool_call>`)
TOOL_TEMPLATE_HINT = (
    "set data.chat_template to one that does: chatml-tools (built in: ChatML with Hermes / Qwen2.5 "
    '`<tool_call>{"name": ..., "arguments": ...}</tool_call>` calls), or a tool-use template file such as '
    "llama.cpp's models/templates/Qwen-Qwen2.5-7B-Instruct.jinja, NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja "
    "or meta-llama-Llama-3.1-8B-Instruct.jinja"
)


class TemplateError(TuneforgeError, ValueError):
    """A chat template that cannot be used to locate assistant turns, or that refuses a conversation."""


class TemplateChoiceError(TemplateError, InputError):
    """A chat template that cannot train these rows at all (it would drop their tool calls, its turns cannot be
    told apart, it renders nothing): data.chat_template must change (exit 2)."""


def refusal(error: Exception) -> str:
    """What a template said when it refused a conversation (its `raise_exception` message, an undefined value),
    or why its assistant turns cannot be found in this conversation."""
    message = str(getattr(error, "message", None) or error).strip() or type(error).__name__
    return message if type(error) in (JinjaError, TemplateError) else f"{type(error).__name__}: {message}"


def _apply(tokenizer, template: str, messages: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
    )


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template does with tools and with the generation prompt, found by rendering probe
    conversations once (`template_traits`)."""

    arguments: str | None  # a call's arguments as the template renders them: "object" | "string"; None: no calls
    tools: bool  # it writes the tools' schemas
    results: bool  # it writes tool results
    needs_tools: bool  # it fails without tools (rows without any are rendered with tools=[])
    trailer: str  # text it writes after every conversation's last turn (see `_trailer`); '' when none
    unknown: str  # the variable it cannot do without that apply_chat_template does not pass; '' when none

    def missing(self, used: set[str]) -> list[str]:
        have = {"tools": self.tools, "tool calls": self.arguments is not None, "tool results": self.results}
        return [what for what in ("tools", "tool calls", "tool results") if what in used and not have[what]]


_PROBE_ARGS = {"city": "Pariz-probe"}
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_weather",
            "description": "Probe-description-31",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
_PROBE_RESULT = "Probe-result-47"
_PROBE_REPLY = "Probe-reply-59"
_TRAITS: dict[tuple, TemplateTraits] = {}


def _probe(arguments: str) -> list[dict]:
    call = {"id": "call00000", "type": "function", "function": {"name": "probe_weather", "arguments": _PROBE_ARGS}}
    stored = [
        {"role": "user", "content": "What is the weather in Pariz?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call00000"},
        {"role": "assistant", "content": "Sunny."},
    ]
    return for_template(stored, arguments)[0]


def end_marker(tokenizer, tail: str, other: str | None) -> str:
    """The end-of-turn marker: the start of `tail` (the text after a reply) that `other` (the text after the same
    reply when something else follows) shares token for token, less trailing whitespace."""
    if other is None or other.startswith(tail):
        return tail.rstrip()
    if tail.startswith(other):  # nothing follows in `other`: its whole text is the turn's
        return other.rstrip()
    a = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
    b = tokenizer(other, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a["input_ids"]), len(b)) and a["input_ids"][n] == b[n]:
        n += 1
    return tail[: a["offset_mapping"][n - 1][1] if n else 0].rstrip()


def _trailer(tokenizer, template: str, plain: list[dict], ending: str, tools) -> str:
    """The text a template writes after every conversation's last reply, past the end-of-turn marker, other
    than an end-of-text token (Phi-3's `<|endoftext|>`): Command-R's tool_use templates end every conversation
    with an instruction turn, or the assistant's turn header even when not asked for it. '' when none."""
    going_on = _apply(tokenizer, template, [*plain, {"role": "user", "content": "Again"}], False, tools)
    after = ending[ending.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    marker = end_marker(tokenizer, after, going_on[going_on.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :])
    trailer = after[len(marker) :].strip()
    return "" if not trailer or trailer in tokenizer.all_special_tokens else after.strip()


def _call_written(rendered: str) -> bool:
    """Whether the probe's call is written with its arguments as JSON, not escaped as markup around them (Mistral's
    templates join an object's `tojson` to text, which jinja then escapes: `{&#34;name&#34;: ...`)."""
    at = max(rendered.find('"city": "Pariz-probe"'), rendered.find('"city":"Pariz-probe"'))
    return at >= 0 and not any(e in rendered[max(at - 80, 0) : at + 80] for e in ("&#34;", "&quot;", "&#39;"))


def template_traits(tokenizer: PreTrainedTokenizerBase, template: str) -> TemplateTraits:
    """How `template` renders tools, calls and results, and its generation prompt (measured once per template
    and special tokens)."""
    key = (template, tokenizer.name_or_path, len(tokenizer), repr(tokenizer.special_tokens_map))
    if key in _TRAITS:
        return _TRAITS[key]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    needs_tools, trailer, unknown = False, "", ""
    for tools in (None, []):  # a template that refuses even this says so when a row is rendered
        try:
            ending = _apply(tokenizer, template, plain, False, tools)
        except UndefinedError as e:  # it wants a variable apply_chat_template does not pass
            unknown = unknown or str(e.message)
            continue
        except Exception:
            continue
        unknown, needs_tools = "", tools is not None
        try:
            trailer = _trailer(tokenizer, template, plain, ending, tools)
        except Exception:
            pass
        break
    arguments, text = None, ""
    for form in ("object", "string"):
        try:
            rendered = _apply(tokenizer, template, _probe(form), False, _PROBE_TOOLS)
        except Exception:
            continue
        text = text or rendered
        if _call_written(rendered):
            arguments, text = form, rendered
            break
    if not text:  # no call renders: are tools and results written without one?
        stored = [*_probe("object")[:1], {"role": "assistant", "content": "Sunny."}]
        try:
            text = _apply(tokenizer, template, stored, False, _PROBE_TOOLS)
        except Exception:
            text = ""
    wrote = ("Probe-description-31" in text, _PROBE_RESULT in text)
    traits = TemplateTraits(arguments, *wrote, needs_tools, trailer, unknown)
    _TRAITS[key] = traits
    return traits


def usable_template(tokenizer, template: str, used: set[str]) -> TemplateTraits:
    """The template's traits; TemplateChoiceError when it cannot train rows that use `used` (see `uses_tools`):
    it renders no plain conversation, writes text of its own after every conversation, or would drop the rows'
    tools, calls or results."""
    traits = template_traits(tokenizer, template)
    if traits.unknown:
        raise TemplateChoiceError(
            f"the chat template cannot render even a plain user / assistant conversation: {traits.unknown} (it "
            "needs a variable that transformers' apply_chat_template does not pass, as llama.cpp's firefunction-v2 "
            "template needs `functions` and `datetime`); use another template (data.chat_template: chatml, "
            "chatml-tools, or a template file)"
        )
    if traits.trailer:
        raise TemplateChoiceError(
            f"the chat template ends every conversation with text of its own after the last turn "
            f"({traits.trailer[:100]!r}...), as templates made only for prompting a model do, so where an assistant "
            "turn ends cannot be told from that text; use a template made for training too (data.chat_template: "
            "chatml, chatml-tools, or a template file)"
        )
    missing = traits.missing(used)
    if missing:
        raise TemplateChoiceError(
            f"the rows have {' and '.join(missing)}, which the chat template does not render (they would be "
            f"dropped from the training text without a word); {TOOL_TEMPLATE_HINT}"
        )
    return traits


def render(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    generation_prompt: bool,
    tools: list[dict] | None = None,
) -> str:
    """One conversation as text: stored rows (tools carried in their messages) or OpenAI messages with `tools`."""
    traits = template_traits(tokenizer, template)
    missing = traits.missing(uses_tools(messages) | ({"tools"} if tools else set()))
    if missing:
        raise TemplateChoiceError(f"the chat template does not render {' and '.join(missing)}; {TOOL_TEMPLATE_HINT}")
    msgs, carried = for_template(messages, traits.arguments or "object")
    tools = tools if tools is not None else carried
    return _apply(tokenizer, template, msgs, generation_prompt, [] if tools is None and traits.needs_tools else tools)


def _direct_renderer(tokenizer, template: str):
    """The compiled jinja template called directly with what apply_chat_template passes it (the messages, the
    tools, no documents, the tokenizer's special tokens): the same text for tuneforge's plain messages,
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

    def render_direct(msgs: list[dict], flag: bool, tools: list[dict] | None) -> str:
        variables = {**base, "messages": msgs, "add_generation_prompt": flag, "tools": tools}
        return env.concat(root(new_context(env, name, blocks, variables, True, globals_)))

    return render_direct


def _guarded(call, *args):
    """A template call; a template's own failure (a TypeError in its jinja, say) as TemplateError."""
    try:
        return call(*args)
    except (JinjaError, TemplateError):
        raise
    except Exception as e:
        raise TemplateError(f"{type(e).__name__}: {e}") from e


def render_many(
    tokenizer, template: str, requests: list[tuple[list[dict], bool, list[dict] | None]], needs_tools: bool = False
) -> list[str]:
    """Texts of many (messages as `for_template` gives them, generation_prompt, tools) requests, as
    apply_chat_template renders them, without its per-call overhead: the template is called directly when its
    first rendering of each kind (flag, with or without tools) equals apply_chat_template's, else one
    apply_chat_template call per request. An empty conversation is rendered alone, to fail as alone.
    `needs_tools`: requests without tools get tools=[] (see `ToolSupport`)."""
    if needs_tools:
        requests = [(m, g, [] if t is None else t) for m, g, t in requests]
    out = [""] * len(requests)
    direct = _direct_renderer(tokenizer, template)
    for flag in (False, True):
        for with_tools in (False, True):
            idx = [k for k, (m, g, t) in enumerate(requests) if g is flag and m and (t is not None) is with_tools]
            if not idx:
                continue
            first_msgs, _, first_tools = requests[idx[0]]
            first = _guarded(_apply, tokenizer, template, first_msgs, flag, first_tools)
            if direct is not None and _guarded(direct, first_msgs, flag, first_tools) == first:
                texts = [first] + [_guarded(direct, requests[k][0], flag, requests[k][2]) for k in idx[1:]]
            else:
                texts = [first]
                texts += [_guarded(_apply, tokenizer, template, requests[k][0], flag, requests[k][2]) for k in idx[1:]]
            for k, text in zip(idx, texts):
                out[k] = text
    for k, (msgs, g, t) in enumerate(requests):
        if not msgs:
            out[k] = _guarded(_apply, tokenizer, template, msgs, g, t)
    return out
