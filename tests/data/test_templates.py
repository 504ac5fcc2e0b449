"""Loss masks on real tokenizers and chat templates from ../shared/data/tokenizers."""

import pytest
from transformers import AutoTokenizer

from tests.conftest import shared_path
from tuneforge.data.masks import end_of_turn_ids, tokenize_chat, tokenize_text
from tuneforge.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, TemplateError, resolve_template

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "mistral-7b-v0.1": "</s>", "phi-3-mini": "<|end|>"}


def tokenizer(name):
    return AutoTokenizer.from_pretrained(str(shared_path(f"tokenizers/{name}")))


def trained_runs(ids, labels):
    """Contiguous runs of trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_only_assistant_contents_and_their_end_of_turn_are_trained(name):
    tok = tokenizer(name)
    template, source = resolve_template(tok, "auto")
    assert source == "tokenizer"
    ids, labels = tokenize_chat(tok, template, CONVERSATION, "assistant")
    assert len(ids) == len(labels)
    eot = END_OF_TURN[name]
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == [f"It is 4.{eot}", f"Six, of course.{eot}"]
    # everything else (system, user, scaffolding) is -100
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for text in ("terse assistant", "two plus two", "three plus three"):
        assert text in untrained
    assert "It is 4" not in untrained and "Six" not in untrained
    # the trained end-of-turn token id is a single special token, and a stop token for generation
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(1 for lab in labels if lab == eot_id) == 2
    assert eot_id in end_of_turn_ids(tok, template)


@pytest.mark.parametrize("name", ["qwen2.5", "llama3"])
def test_train_on_last_turn_only(name):
    tok = tokenizer(name)
    template, _ = resolve_template(tok, "auto")
    ids, labels = tokenize_chat(tok, template, CONVERSATION, "last")
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == [f"Six, of course.{END_OF_TURN[name]}"]


def test_train_on_all_trains_every_token():
    tok = tokenizer("qwen2.5")
    template, _ = resolve_template(tok, "auto")
    ids, labels = tokenize_chat(tok, template, CONVERSATION, "all")
    assert labels == ids


def test_alpaca_rows_on_a_tokenizer_without_template_use_builtin_alpaca():
    tok = tokenizer("llama2")
    assert not tok.chat_template
    template, source = resolve_template(tok, "auto")
    assert source == "alpaca" and template == BUILTIN_TEMPLATES["alpaca"]
    msgs = [
        {"role": "user", "content": "Name a primary colour.\n\nOne word."},
        {"role": "assistant", "content": "Blue"},
    ]
    ids, labels = tokenize_chat(tok, template, msgs, "assistant")
    runs = trained_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["Blue</s>"]
    assert runs[0][-1] == tok.eos_token_id
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    prompt = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "### Instruction:\nName a primary colour." in prompt and prompt.rstrip().endswith("### Response:")


def test_chatml_builtin_on_gpt2_trains_im_end_pieces():
    tok = tokenizer("gpt2")
    template, source = resolve_template(tok, "chatml")
    assert source == "chatml"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    ids, labels = tokenize_chat(tok, template, msgs, "assistant")
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == ["hello there<|im_end|>"]


def test_completion_text_trains_everything_plus_eos():
    tok = tokenizer("gpt2")
    ids, labels = tokenize_text(tok, "Once upon a time")
    assert ids == labels and ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "Once upon a time"


def test_template_without_end_marker_gets_eos_appended():
    tok = tokenizer("gpt2")
    template = (
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    ids, labels = tokenize_chat(
        tok, template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "assistant"
    )
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == ["yo<|endoftext|>"]
    assert tok.decode(ids).endswith("assistant:\nyo<|endoftext|>\n")  # EOS right after the content
    # every assistant turn of a longer conversation gets its EOS, right after its reply
    ids, labels = tokenize_chat(tok, template, CONVERSATION[1:], "assistant")
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == [
        "It is 4.<|endoftext|>",
        "Six, of course.<|endoftext|>",
    ]
    assert "assistant:\nIt is 4.<|endoftext|>\nuser:\nAnd three plus three?" in tok.decode(ids)


def test_unknown_template_name_is_a_clear_error():
    tok = tokenizer("gpt2")
    builtins = r"\(alpaca, chatml, chatml-tools\)"
    with pytest.raises(TemplateError, match=rf"data.chat_template='chatmll' is neither a built-in {builtins}"):
        resolve_template(tok, "chatmll")
