"""Dataset tokenization (encode.py): chunked rendering + tokenizing, bisected labels, worker processes, truncation."""

import ctypes
import os

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

import tuneforge.data.encode as encode
from tests.conftest import shared_path
from tuneforge.config.schema import DataConfig
from tuneforge.data.masks import (
    Encoded,
    TokenizedRows,
    _labels,
    backend_as_called,
    encode_texts,
    monotone_offsets,
    tokenize_chat,
    tokenize_text,
)
from tuneforge.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, chats_rendered, resolve_template


def tokenizer(name):
    return AutoTokenizer.from_pretrained(str(shared_path(f"tokenizers/{name}")))


def chat(*turns):
    return [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * len(turns), turns)]


ROWS = [  # chats and completion texts ([] messages), byte-fallback emoji at the very start of a trained span
    chat("Say hi 😀", "😀 hi"),
    [],
    chat("é?", "中文 ok", "again", "👍🏽 sure"),
    chat("Empty answer?", ""),
    [],
    chat("Two plus two?", "Four."),
    chat("Tabs\tand\nlines", "  spaced  out  "),
]
TEXTS = ["" if m else f"plain completion {i} ünïcode" for i, m in enumerate(ROWS)]


@pytest.mark.parametrize(
    "name,choice,train_on",
    [
        ("llama2", "alpaca", "assistant"),
        ("qwen2.5", "auto", "assistant"),
        ("qwen2.5", "auto", "last"),
        ("gpt2", "chatml", "all"),
    ],
)
def test_chunks_give_each_rows_own_ids_and_labels(name, choice, train_on):
    tok = tokenizer(name)
    template, _ = resolve_template(tok, choice)
    chunks = [(ROWS[i : i + 2], TEXTS[i : i + 2]) for i in range(0, len(ROWS), 2)]  # 4 chunks: later ones bisect
    got = encode.tokenize_rows(tok, template, chunks, train_on).rows()
    want = [tokenize_chat(tok, template, m, train_on) if m else tokenize_text(tok, t) for m, t in zip(ROWS, TEXTS)]
    assert got == want


def test_first_trained_tokens_are_the_emoji_bytes_and_end_of_turn():
    tok = tokenizer("llama2")
    chunks = [(ROWS[:1], TEXTS[:1]), (ROWS[:1], TEXTS[:1])]  # the second row's labels come from bisection
    rows = encode.tokenize_rows(tok, BUILTIN_TEMPLATES["alpaca"], chunks, "assistant").rows()
    for ids, labels in rows:
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tok.convert_ids_to_tokens(trained) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁hi", "</s>"]
        # the BOS id, then "▁Below" as tokenizer(prompt) gives it (not "Bel", "ow"); nothing after the final EOS
        assert tok.convert_ids_to_tokens(ids[:2]) == ["<s>", "▁Below"] and labels[:2] == [IGNORE_INDEX] * 2
        assert len(ids) == 50 and labels[-1] == tok.eos_token_id


def test_bisected_labels_equal_the_offsets_rule_on_many_turns():
    tok = tokenizer("qwen2.5")
    template, _ = resolve_template(tok, "auto")
    convs = [m for m in ROWS if m] * 3
    texts, spans = chats_rendered(tok, template, convs, "assistant")
    enc = encode_texts(tok, backend_as_called(tok), texts)
    assert monotone_offsets(enc)
    exact = _labels(enc, spans, "assistant")
    assert np.array_equal(_labels(enc, spans, "assistant", search=True), exact)
    assert int((exact != IGNORE_INDEX).sum()) == 3 * (3 + 7 + 1 + 3 + 6)  # e.g. "👍", "🏽", " sure", "<|im_end|>"


class FakeEncoding:
    def __init__(self, offsets):
        self.offsets = offsets

    def token_to_chars(self, t):
        return self.offsets[t]

    def char_to_token(self, pos):
        return next((t for t, (s, e) in enumerate(self.offsets) if s <= pos < e), None)


def test_offsets_that_decrease_are_detected_and_bisection_would_be_wrong_there():
    offsets = [(0, 2), (2, 3), (9, 10), (3, 6)]  # token 2 points past the span [2, 6): not monotone
    enc = Encoded(np.array([10, 11, 12, 13]), np.array([4]), [FakeEncoding(offsets)], np.array(offsets))
    assert not monotone_offsets(enc)
    assert _labels(enc, [[(2, 6, True)]], "assistant").tolist() == [IGNORE_INDEX, 11, IGNORE_INDEX, 13]
    assert _labels(enc, [[(2, 6, True)]], "assistant", search=True).tolist() == [IGNORE_INDEX, 11, 12, 13]
    # steps from one text to the next do not count
    two = Encoded(np.array([1, 2, 3]), np.array([2, 1]), None, np.array([(0, 1), (1, 5), (0, 1)]))
    assert monotone_offsets(two)


def test_tokenize_rows_keeps_the_offsets_rule_when_offsets_decrease(monkeypatch):
    monkeypatch.setattr(encode, "monotone_offsets", lambda enc: False)
    searched = []
    real = encode.chats_tokenized
    monkeypatch.setattr(
        encode, "chats_tokenized", lambda *a, search=False: searched.append(search) or real(*a, search=search)
    )
    tok = tokenizer("qwen2.5")
    template, _ = resolve_template(tok, "auto")
    rows = encode.tokenize_rows(tok, template, [(ROWS[:3], TEXTS[:3]), (ROWS[3:], TEXTS[3:])], "assistant").rows()
    assert searched == [False, False]
    assert rows[5] == tokenize_chat(tok, template, ROWS[5], "assistant")


def test_worker_processes_give_the_same_arrays(monkeypatch):
    tok = tokenizer("qwen2.5")
    template, _ = resolve_template(tok, "auto")
    n = 2 * encode.CHUNK_ROWS + 50
    ds = datasets.Dataset.from_list([{"messages": ROWS[i % len(ROWS)], "text": TEXTS[i % len(ROWS)]} for i in range(n)])
    here = TokenizedRows.concat(encode.tokenize_dataset(ds, tok, template, "assistant", None))
    monkeypatch.setattr(encode, "WORKER_PROCESSES_FROM", 2)
    (workers,) = encode.tokenize_dataset(ds, tok, template, "assistant", 2)  # one part from the workers' Arrow
    for field in ("ids", "labels", "lengths"):
        assert np.array_equal(getattr(here, field), getattr(workers, field))
    assert len(here.lengths) == n and int(here.lengths[: len(ROWS)].sum()) == sum(
        len(tokenize_chat(tok, template, m, "assistant")[0] if m else tokenize_text(tok, t)[0])
        for m, t in zip(ROWS, TEXTS)
    )


def test_process_environment_follows_os_environ_again(monkeypatch):
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    os.putenv("TOKENIZERS_PARALLELISM", "false")  # what datasets.map(num_proc=...) leaves behind
    assert getenv(b"TOKENIZERS_PARALLELISM") == b"false" and "TOKENIZERS_PARALLELISM" not in os.environ
    encode.restore_tokenizers_parallelism()
    assert getenv(b"TOKENIZERS_PARALLELISM") is None
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a user's own setting stays
    os.unsetenv("TOKENIZERS_PARALLELISM")
    encode.restore_tokenizers_parallelism()
    assert getenv(b"TOKENIZERS_PARALLELISM") == b"false"


def data_config(**kw):
    return DataConfig(train=[{"synthetic": {"task": "add", "rows": 4}}], max_seq_len=64, **kw)


def test_split_truncates_or_drops_and_counts_trained_tokens():
    tok = tokenizer("llama2")
    rows = [chat("Short?", "Yes."), chat("Long?", "word " * 80), chat("Nothing?", "")]
    ds = datasets.Dataset.from_list([{"messages": m, "text": "", "score": None, "source_id": 0} for m in rows])
    template = BUILTIN_TEMPLATES["alpaca"]
    full = [tokenize_chat(tok, template, m, "assistant") for m in rows]
    assert [len(ids) for ids, _ in full] == [41, 120, 39]
    d = data_config(overlong="truncate", quality={"min_tokens": 40})
    kept, report = encode.tokenize_split(ds, tok, template, d, "train")
    assert kept.column_names == [
        "messages",
        "text",
        "score",
        "source_id",
        "input_ids",
        "labels",
        "num_tokens",
        "num_trained",
    ]
    assert kept["num_tokens"] == [41, 64] and kept["num_trained"] == [3, 26]  # "▁Yes", ".", "</s>"; position 0 never
    assert kept["input_ids"][1] == full[1][0][:64] and kept["labels"][1] == full[1][1][:64]
    assert kept["messages"] == rows[:2]
    assert (report["rows"], report["truncated_rows"], report["dropped_short_or_untrained_rows"]) == (2, 1, 1)
    assert report["tokens"] == 105 and report["trained_tokens"] == 29 and report["length"]["max"] == 64
    dropped, report = encode.tokenize_split(
        ds, tok, template, data_config(overlong="drop"), "train", source_columns=False
    )
    assert dropped.column_names == ["input_ids", "labels", "num_tokens", "num_trained"]
    assert dropped["num_tokens"] == [41, 39] and dropped["num_trained"] == [3, 1]  # an empty answer still trains EOS
    assert (report["dropped_overlong_rows"], report["truncated_rows"]) == (1, 0)
    assert (
        dropped.features["input_ids"].feature.dtype == "int32" and dropped.features["labels"].feature.dtype == "int64"
    )


def test_rows_picked_by_select_are_read_in_blocks_in_their_order(monkeypatch):
    rows = [{"messages": chat(f"q{i}", f"a{i}"), "text": f"t{i}"} for i in range(50)]
    ds = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(encode, "CHUNK_ROWS", 8)
    picks = {
        "kept by filters": [i for i in range(50) if i % 3],
        "sparse": list(range(0, 50, 7)),
        "repeated (upsampling)": [1, 1, 2, 5, 5, 5, 9],
        "shuffled": [7, 3, 9, 0],
        "all": None,
    }
    for name, idx in picks.items():
        sel = ds if idx is None else ds.select(idx)
        chunks = list(encode._row_chunks(sel))
        assert [len(m) for m, _ in chunks] == [min(8, len(sel) - s) for s in range(0, len(sel), 8)], name
        assert [t for _, texts in chunks for t in texts] == sel["text"], name
        assert [m for msgs, _ in chunks for m in msgs] == sel["messages"], name


def test_truncation_or_padding_preset_on_the_rust_tokenizer_is_not_applied():
    tok = tokenizer("gpt2")
    template = BUILTIN_TEMPLATES["chatml"]
    msgs = chat("Tell me a long story about a river.", "Once upon a time a river ran to the sea and back again.")
    text = chats_rendered(tok, template, [msgs], "assistant")[0][0]
    full = tok(text, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(8)  # as a tokenizer.json may preset them
    tok.backend_tokenizer.enable_padding(length=64)
    ids, labels = tokenize_chat(tok, template, msgs, "assistant")
    assert (
        ids == full
        and len(ids) == 56
        and tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        == "Once upon a time a river ran to the sea and back again.<|im_end|>"
    )


@pytest.mark.parametrize(
    "name,split",
    [
        ("llama2", True),
        ("mistral-7b-v0.1", True),
        ("llama3", False),
        ("qwen2.5", False),
        ("gpt2", False),
        ("phi-3-mini", False),
    ],
)
def test_chats_tokenize_as_the_tokenizer_does_the_rendered_text(name, split):
    # a template that writes BOS as text: SentencePiece-style tokenizers would drop the first word's prefix space
    from tuneforge.data.masks import leading_bos, prompt_ids
    from tuneforge.data.templates import render

    tok = tokenizer(name)
    template = BUILTIN_TEMPLATES["alpaca"]
    assert (leading_bos(tok) is not None) == split
    msgs = chat("Name a colour.", "Blue.")
    text = render(tok, template, msgs, False)
    chunks = [([msgs, msgs], ["", ""])] * 2  # the second chunk's labels come from bisection
    rows = encode.tokenize_rows(tok, template, chunks, "assistant").rows()
    ids, labels = rows[-1]
    if split:
        assert text.startswith(tok.bos_token) and ids == tok(text[len(tok.bos_token) :])["input_ids"]
    else:
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert all(r == rows[0] for r in rows) and tokenize_chat(tok, template, msgs, "assistant") == rows[0]
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained.replace(" ", "") == "Blue." + (tok.eos_token or "")
    prompt = prompt_ids(tok, template, msgs[:1])  # generation sees the prompt as training did
    assert ids[: len(prompt)] == prompt


def test_rows_the_template_refuses_are_found_in_this_process_and_in_workers(monkeypatch):
    from tuneforge.data.formats import DataFormatError
    from tuneforge.data.templates import TemplateError

    tok = tokenizer("qwen2.5")
    template = (
        "{% for m in messages %}{% if m['content'] == 'refuse me' %}{{ raise_exception('No refusals here.') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    monkeypatch.setattr(encode, "CHUNK_ROWS", 8)
    rows = [chat(f"question {i}", "refuse me" if i in (3, 17, 30) else f"answer {i}") for i in range(40)]
    ds = datasets.Dataset.from_list(
        [{"messages": m, "text": "", "source_id": 0, "source_row": i} for i, m in enumerate(rows)]
    )
    refused_here: dict = {}
    here = TokenizedRows.concat(encode.tokenize_dataset(ds, tok, template, "assistant", None, refused=refused_here))
    monkeypatch.setattr(encode, "WORKER_PROCESSES_FROM", 2)
    refused_workers: dict = {}
    (workers,) = encode.tokenize_dataset(ds, tok, template, "assistant", 2, refused=refused_workers)
    assert refused_here == refused_workers == {3: "No refusals here.", 17: "No refusals here.", 30: "No refusals here."}
    assert np.array_equal(here.lengths, workers.lengths) and here.lengths[[3, 17, 30]].tolist() == [0, 0, 0]
    assert here.lengths[4] == len(tokenize_chat(tok, template, rows[4], "assistant")[0])
    with pytest.raises(TemplateError, match="the chat template refused a conversation: No refusals here."):
        encode.tokenize_dataset(ds, tok, template, "assistant", None)
    d = data_config(skip_invalid=True)
    kept, report = encode.tokenize_split(ds, tok, template, d, "train", locate=lambda sid, row: f"f.jsonl:{row + 1}")
    assert len(kept) == 37 and report["dropped_short_or_untrained_rows"] == 0
    assert report["template_errors"] == {
        "skipped": 3,
        "reasons": {"refused by the chat template: No refusals here.": 3},
        "by_source": {"0": 3},
        "examples": [f"f.jsonl:{n}: the chat template refused this row: No refusals here." for n in (4, 18, 31)],
    }
    with pytest.raises(
        DataFormatError,
        match=r"^f.jsonl:4: the chat template refused this row: No refusals here. "
        r"\(2 more rows refused\); fix the row",
    ):
        encode.tokenize_split(ds, tok, template, data_config(), "train", locate=lambda sid, row: f"f.jsonl:{row + 1}")
