"""Every community chat template in ../shared/data/chat_templates, paired with a tokenizer that fits it, trains
exactly or is refused with its reason; docs/chat-templates.md is the table of these results.

"Exactly": the trained tokens of each assistant turn decode to the reply (with the text the template has the model
write before it, functionary's `all\\n`) and its end-of-turn marker, nothing else; whitespace at the very edges
is compared loosely, as a tokenizer joins a reply's leading space to its first word. A template without an
end-of-turn marker gets the tokenizer's EOS written after each reply. A tokenizer "fits" when it is the model's
own family; where the model's tokenizer adds the template's markers as special tokens (Gemma, DeepSeek-R1, the
Hermes ChatML tokens on Llama-3, Mistral v3's control tokens) they are added to the shared tokenizer too, as
the model does ("mistral-7b-v0.1:v3" is that tokenizer with Mistral v3's control tokens).
"""

from __future__ import annotations

import functools

import pytest
from transformers import AutoTokenizer

from tests.conftest import SHARED_DATA, shared_path
from tests.data.helpers import CALL, TOOLS
from tuneforge.data.masks import end_of_turn_ids, tokenize_chat
from tuneforge.data.rendering import TemplateChoiceError
from tuneforge.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, TemplateError, chats_rendered
from tuneforge.data.tool_calls import calls_text, tools_message

GEMMA = ("<start_of_turn>", "<end_of_turn>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")
CHATML = ("<|im_start|>", "<|im_end|>")
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]")
MISTRAL_CONTROL += ("[/TOOL_RESULTS]",)
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'

# template -> (tokenizer, special tokens its model adds, text before each reply, end-of-turn marker, the trained
# text of a tool call (None: the template renders no calls), whether it takes a system message)
TRAINS = {
    "chujiezheng-alpaca": ("llama2", (), "", "</s>", None, True),
    "chujiezheng-amberchat": ("llama2", (), "", "</s>", None, True),  # no marker: EOS written
    "chujiezheng-chatml": ("qwen2.5", (), "", "<|im_end|>", None, True),
    "chujiezheng-chatqa": ("llama3", (), "", "<|eot_id|>", None, True),  # no marker: EOS written
    "chujiezheng-falcon-instruct": ("gpt2", (), "", "<|endoftext|>", None, True),  # no marker: EOS written
    "chujiezheng-gemma-it": ("llama2", GEMMA, "", "<end_of_turn>", None, True),
    "chujiezheng-granite-3.0-instruct": ("gpt2", (), "", "<|end_of_text|>", None, True),
    "chujiezheng-llama-2-chat": ("llama2", (), "", " </s>", None, True),
    "chujiezheng-llama-3-instruct": ("llama3", (), "", "<|eot_id|>", None, True),
    "chujiezheng-mistral-instruct": ("mistral-7b-v0.1", (), "", "</s>", None, True),
    "chujiezheng-openchat-3.5": ("mistral-7b-v0.1", ("<|end_of_turn|>",), "", "<|end_of_turn|>", None, True),
    "chujiezheng-phi-3-small": ("phi-3-mini", (), "", "<|end|>", None, True),
    "chujiezheng-phi-3": ("phi-3-mini", (), "", "<|end|>", None, True),
    "chujiezheng-qwen2.5-instruct": ("qwen2.5", (), "", "<|im_end|>", QWEN_CALL, True),
    "chujiezheng-saiga": ("llama2", (), "", "</s>", None, True),
    "chujiezheng-solar-instruct": ("llama2", (), "", "</s>", None, True),  # no marker: EOS written
    "chujiezheng-vicuna": ("llama2", (), "", "</s>", None, True),
    "chujiezheng-zephyr": ("mistral-7b-v0.1", (), "", "</s>", None, True),
    "llamacpp-NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("llama3", CHATML, "", "<|im_end|>", QWEN_CALL, True),
    "llamacpp-NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("llama3", CHATML, "", "<|im_end|>", QWEN_CALL, True),
    "llamacpp-Qwen-Qwen2.5-7B-Instruct": ("qwen2.5", (), "", "<|im_end|>", QWEN_CALL, True),
    "llamacpp-deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("llama3", DEEPSEEK, "", "<｜end▁of▁sentence｜>", None, True),
    "llamacpp-deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("qwen2.5", DEEPSEEK, "", "<｜end▁of▁sentence｜>", None, True),
    "llamacpp-google-gemma-2-2b-it": ("llama2", GEMMA, "", "<end_of_turn>", None, False),
    "llamacpp-llama-cpp-deepseek-r1": ("qwen2.5", DEEPSEEK, "", "<｜end▁of▁sentence｜>", None, True),
    "llamacpp-meetkai-functionary-medium-v3.1": (
        "llama3",
        (),
        "",
        "<|eot_id|>",
        '<function=get_weather>{"city": "Paris"}</function><|eom_id|>',
        True,
    ),
    "llamacpp-meetkai-functionary-medium-v3.2": (
        "llama3",
        (),
        "all\n",
        "<|eot_id|>",
        'get_weather\n{"city": "Paris"}<|eot_id|>',
        True,
    ),
    "llamacpp-meta-llama-Llama-3.1-8B-Instruct": ("llama3", (), "", "<|eot_id|>", LLAMA_CALL, True),
    "llamacpp-meta-llama-Llama-3.2-3B-Instruct": ("llama3", (), "", "<|eot_id|>", LLAMA_CALL, True),
    "llamacpp-meta-llama-Llama-3.3-70B-Instruct": ("llama3", (), "", "<|eot_id|>", LLAMA_CALL, True),
    "llamacpp-microsoft-Phi-3.5-mini-instruct": ("phi-3-mini", (), "", "<|end|>", None, True),
    "llamacpp-mistralai-Mistral-Nemo-Instruct-2407": (
        "mistral-7b-v0.1:v3",
        MISTRAL_CONTROL,
        "",
        "</s>",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00000"}]</s>',
        True,
    ),
    "mistral-common-v1_spm": ("mistral-7b-v0.1", (), "", "</s>", None, True),
    "mistral-common-v2_spm": (
        "mistral-7b-v0.1:v3",
        MISTRAL_CONTROL,
        "",
        "</s>",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>',
        True,
    ),
    "mistral-common-v3_spm": (
        "mistral-7b-v0.1:v3",
        MISTRAL_CONTROL,
        "",
        "</s>",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00000"}]</s>',
        True,
    ),
}
# template -> (tokenizer, what the refusal says)
REFUSED = {
    "llamacpp-CohereForAI-c4ai-command-r-plus-tool_use": ("qwen2.5", "ends every conversation with text of its own"),
    "llamacpp-CohereForAI-c4ai-command-r7b-12-2024-tool_use": (
        "qwen2.5",
        "ends every conversation with text of its own",
    ),
    "llamacpp-fireworks-ai-llama-3-firefunction-v2": ("llama3", "'functions' is undefined"),
}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]
TOOL_CONVERSATION = [
    tools_message(TOOLS),
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": calls_text(CALL)},
    {"role": "tool", "content": "22 C and sunny", "tool_call_id": "call00000"},
    {"role": "assistant", "content": "It is 22 C and sunny."},
]


def added_tokens(key: str) -> list[str]:
    """The special tokens the models paired with tokenizer `key` add to it (their templates' markers)."""
    return list(dict.fromkeys(t for tok, added, *_ in TRAINS.values() if tok == key for t in added))


@functools.cache
def tokenizer(key: str):
    """The shared tokenizer `key` ('folder' or 'folder:variant') with every marker its paired models add (no
    other template paired with it writes them: `test_every_shipped_template_is_in_the_table`): each is loaded
    once."""
    tok = AutoTokenizer.from_pretrained(str(shared_path(f"tokenizers/{key.split(':')[0]}")))
    tok.add_tokens(added_tokens(key), special_tokens=True)
    return tok


def template(name: str) -> str:
    return shared_path(f"chat_templates/{name}.jinja").read_text(encoding="utf-8")


def trained_texts(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    return [tok.decode(r) for r in [*runs, *([cur] if cur else [])]]


def test_every_shipped_template_is_in_the_table():
    folder = SHARED_DATA / "chat_templates"
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    assert sorted(p.stem for p in folder.glob("*.jinja")) == sorted([*TRAINS, *REFUSED])
    assert len(REFUSED) <= 3
    for name, (tok, added, *_) in TRAINS.items():  # another model's markers never appear in a template
        others = set(added_tokens(tok)) - set(added)
        assert not [t for t in others if t in (folder / f"{name}.jinja").read_text(encoding="utf-8")], name


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_template_trains_exactly(name):
    tok_name, _, before, marker, call, system = TRAINS[name]
    tok, text = tokenizer(tok_name), template(name)
    conversation = CONVERSATION if system else CONVERSATION[1:]
    ids, labels = tokenize_chat(tok, text, conversation, "assistant")
    got = [t.strip() for t in trained_texts(tok, ids, labels)]
    assert got == [f"{before}It is 4.{marker}".strip(), f"{before}Six, of course.{marker}".strip()]
    if call is None:  # tool rows are refused, naming templates that render them
        with pytest.raises(TemplateChoiceError, match="which the chat template does not render.*chatml-tools"):
            tokenize_chat(tok, text, TOOL_CONVERSATION, "assistant")
        return
    ids, labels = tokenize_chat(tok, text, TOOL_CONVERSATION, "assistant")
    got = [t.strip() for t in trained_texts(tok, ids, labels)]
    assert got == [call, f"{before}It is 22 C and sunny.{marker}".strip()]  # the tool's result is never trained


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_template_is_refused_with_its_reason(name):
    tok_name, reason = REFUSED[name]
    with pytest.raises(TemplateError, match=reason) as refused:
        tokenize_chat(tokenizer(tok_name), template(name), CONVERSATION, "assistant")
    assert isinstance(refused.value, TemplateChoiceError)  # the config must change: exit 2
    assert refused.value.exit_code == 2 and "data.chat_template" in str(refused.value)


def test_builtin_chatml_tools_trains_the_call_and_not_the_result():
    tok = tokenizer("qwen2.5")
    ids, labels = tokenize_chat(tok, BUILTIN_TEMPLATES["chatml-tools"], TOOL_CONVERSATION, "assistant")
    assert trained_texts(tok, ids, labels) == [QWEN_CALL, "It is 22 C and sunny.<|im_end|>"]
    rendered = tok.decode(ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert "<|im_start|>user\n<tool_response>\n22 C and sunny\n</tool_response><|im_end|>" in rendered
    # without tools it is the chatml template
    plain = tokenize_chat(tok, BUILTIN_TEMPLATES["chatml-tools"], CONVERSATION, "assistant")
    assert plain == tokenize_chat(tok, BUILTIN_TEMPLATES["chatml"], CONVERSATION, "assistant")


def test_the_token_that_ends_a_call_stops_generation_too():
    tok = tokenizer("llama3")
    stops = end_of_turn_ids(tok, template("llamacpp-meetkai-functionary-medium-v3.1"))
    assert tok.convert_ids_to_tokens(stops) == ["<|eot_id|>", "<|eom_id|>"]
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok, template("llamacpp-meta-llama-Llama-3.1-8B-Instruct"))) == [
        "<|eot_id|>"
    ]


@pytest.mark.parametrize("name", ["chujiezheng-chatml", "llamacpp-mistralai-Mistral-Nemo-Instruct-2407"])
def test_turns_located_from_the_full_rendering_are_the_same_in_a_batch(name):
    """Templates whose turns are located through the rendering with markers, many conversations at a time (one
    of them refused by the template) give each conversation's rows as alone."""
    tok, text = tokenizer(TRAINS[name][0]), template(name)
    broken = [CONVERSATION[1], CONVERSATION[3], CONVERSATION[2]]  # both refuse roles that do not alternate
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:], broken]
    refused: dict[int, str] = {}
    texts, spans = chats_rendered(tok, text, conversations, "assistant", refused)
    alone = [
        chats_rendered(tok, text, [c], "assistant") if k not in refused else ([""], [[]])
        for k, c in enumerate(conversations)
    ]
    assert (texts, spans) == ([t for (t,), _ in alone], [s for _, (s,) in alone])
    assert list(refused) == [3] and "alternate" in refused[3]
