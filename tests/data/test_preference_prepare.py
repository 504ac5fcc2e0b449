"""Preference and KTO data through the data stage: prompt_ids / chosen_ids / rejected_ids equal to the SFT
tokenization of the same conversation, truncation, the report, the preview and the cache fingerprint."""

import json

import datasets
import pytest
import yaml

from tests.conftest import shared_path
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.masks import tokenize_chat
from tuneforge.data.preference import DataKindError, prepared_kind
from tuneforge.data.prepare import fingerprint, prepare
from tuneforge.data.templates import IGNORE_INDEX

TINY = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "tokenizer_vocab_size": 400}
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Lyon, I think."},
    {
        "system": "Answer in one word.",
        "prompt": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": [{"role": "assistant", "content": "Green"}],
        "rejected": "I would rather talk about the weather today, which is sunny and warm.",
    },
]


def write_jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, sources, tok="qwen2.5", **data):
    model = {"name_or_path": str(shared_path(f"tokenizers/{tok}"))} if tok else {"init": TINY}
    return RunConfig.model_validate(
        {
            "model": model,
            "data": {"train": [{"path": str(p)} for p in sources], "max_seq_len": 256, **data},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def quiet(s):
    return None


GENERATION_PROMPT = {
    "qwen2.5": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-7b-v0.1": "[/INST]",  # SentencePiece: the reply's first token carries its space ("▁Paris")
    None: "<|im_start|>assistant\n",
}


@pytest.mark.parametrize(
    "tok, template", [("qwen2.5", "auto"), ("llama3", "auto"), ("mistral-7b-v0.1", "auto"), (None, "chatml")]
)
def test_prompt_and_completion_ids_equal_the_sft_tokenization(tmp_path, tok, template):
    cfg = config(tmp_path, [write_jsonl(tmp_path, PAIRS)], tok, chat_template=template)
    data = prepare(cfg, tmp_path / "run", log=quiet)
    assert data.report["kind"] == prepared_kind(data.report) == "preference"
    tokenizer, train = data.tokenizer, data.train
    assert {"prompt_ids", "chosen_ids", "rejected_ids", "num_tokens", "num_trained"} <= set(train.column_names)
    assert train.features["chosen_ids"] == datasets.Sequence(datasets.Value("int32"))
    assert len(train) == 2
    end = data.report["stop_token_ids"][-1]  # <|im_end|>, <|eot_id|>
    for row in train:
        prompt = row["prompt_ids"]
        assert tokenizer.decode(prompt).endswith(GENERATION_PROMPT[tok])
        for name in ("chosen", "rejected"):
            completion = row[f"{name}_ids"]
            assert completion[-1] == end
            ids, labels = tokenize_chat(
                tokenizer,
                tokenizer.chat_template,
                [*row["messages"], {"role": "assistant", "content": row[name]}],
                "last",  # an SFT row trained on its last reply only (a pair trains no prompt turn)
            )
            n = len(prompt) + len(completion)
            assert ids[:n] == prompt + completion
            assert labels[:n] == [IGNORE_INDEX] * len(prompt) + completion
            assert all(x == IGNORE_INDEX for x in labels[n:]) and tokenizer.decode(ids[n:]).strip() == ""
        assert row["num_tokens"] == len(prompt) + len(row["chosen_ids"]) + len(row["rejected_ids"])
        assert row["num_trained"] == len(row["chosen_ids"]) + len(row["rejected_ids"])
    if tok == "qwen2.5":
        paris = tokenizer("Paris", add_special_tokens=False)["input_ids"]
        assert train[0]["chosen_ids"] == paris + [151645] and paris == [59604]
        assert tokenizer.decode(train[1]["prompt_ids"]) == (
            "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
            "<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    rep = data.report["train"]
    assert rep["pairs"] == rep["rows"] == 2 and rep["rows_in"] == 2
    assert rep["prompt_tokens"] == sum(map(len, train["prompt_ids"]))
    assert rep["chosen_tokens"] == sum(map(len, train["chosen_ids"]))
    assert rep["tokens"] == rep["prompt_tokens"] + rep["chosen_tokens"] + rep["rejected_tokens"]
    saved = json.loads((tmp_path / "run" / "data" / "data_report.json").read_text())
    assert saved["kind"] == "preference" and saved["train"]["pairs"] == 2


def test_overlong_pairs_truncate_the_prompt_left_and_completions_right_or_are_dropped(tmp_path):
    long_prompt = " ".join(f"word{k}" for k in range(200))
    rows = [*PAIRS, {"prompt": long_prompt, "chosen": " ".join(f"reason{k}" for k in range(60)), "rejected": "no"}]
    path = write_jsonl(tmp_path, rows)
    full = prepare(config(tmp_path, [path], max_seq_len=2048), tmp_path / "full", log=quiet).train[2]
    cut = prepare(config(tmp_path, [path], max_seq_len=64), tmp_path / "run", log=quiet)
    row = cut.train[2]
    assert len(row["prompt_ids"]) == 32 and row["prompt_ids"] == full["prompt_ids"][-32:]
    assert row["chosen_ids"] == full["chosen_ids"][:32] and row["rejected_ids"] == full["rejected_ids"]
    assert cut.report["train"]["truncated_rows"] == 1 and cut.report["train"]["length"]["max"] == 64
    drop = prepare(config(tmp_path, [path], max_seq_len=64, overlong="drop"), tmp_path / "drop", log=quiet)
    assert len(drop.train) == 2 and drop.report["train"]["dropped_overlong_rows"] == 1
    assert drop.report["train"]["truncated_rows"] == 0


def test_kto_rows_prepare_to_prompt_completion_and_label(tmp_path):
    u = {"role": "user", "content": "What is the capital of France?"}
    rows = [
        {"messages": [u, {"role": "assistant", "content": "Paris"}], "label": True},
        {"messages": [u, {"role": "assistant", "content": "Berlin"}], "label": False},
    ]
    data = prepare(config(tmp_path, [write_jsonl(tmp_path, rows)]), tmp_path / "run", log=quiet)
    assert prepared_kind(data.report) == "kto"
    assert {"prompt_ids", "completion_ids", "num_tokens", "num_trained", "label"} <= set(data.train.column_names)
    assert "chosen_ids" not in data.train.column_names and data.train.features["label"] == datasets.Value("bool")
    assert data.train["label"] == [True, False]
    assert data.train[0]["prompt_ids"] == data.train[1]["prompt_ids"]
    berlin = data.tokenizer("Berlin", add_special_tokens=False)["input_ids"]
    assert data.train[1]["completion_ids"] == berlin + [151645]
    rep = data.report["train"]
    assert (rep["rows"], rep["desirable"], rep["undesirable"]) == (2, 1, 1)


def test_shared_preference_files_prepare(tmp_path):
    hh = shared_path("preference/harmless-base_test.jsonl.gz")
    data = prepare(
        config(tmp_path, [hh], skip_invalid=True, max_seq_len=512, decontaminate={"against_eval": False}),
        tmp_path / "hh",
        log=quiet,
    )
    rep = data.report
    assert rep["kind"] == "preference" and rep["invalid"]["skipped"] == 9 and rep["rows_read"] == 2303
    assert rep["train"]["pairs"] == len(data.train) == rep["train"]["rows_in"]
    assert all(
        len(p) + max(len(c), len(r)) <= 512
        for p, c, r in zip(*(data.train[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    )
    kto = prepare(
        config(tmp_path, [shared_path("chat/kto_en_demo.json")], max_seq_len=1024), tmp_path / "kto", log=quiet
    )
    removed = kto.report["dedup"]["exact_removed"] + sum(v["removed"] for v in kto.report["quality"].values())
    assert kto.report["kind"] == "kto" and kto.report["rows_read"] == 300
    assert kto.report["train"]["rows_in"] == 300 - removed and removed <= 5
    assert kto.report["train"]["desirable"] + kto.report["train"]["undesirable"] == len(kto.train)
    dpo = prepare(config(tmp_path, [shared_path("preference/dpo_en_demo.json")]), tmp_path / "dpo", log=quiet)
    assert dpo.report["kind"] == "preference" and dpo.report["train"]["rows_in"] == 300 - dpo.report["dedup"][
        "exact_removed"
    ] - sum(v["removed"] for v in dpo.report["quality"].values())


def test_mixed_kinds_and_packing_are_refused_naming_the_sources(tmp_path):
    pairs = write_jsonl(tmp_path, PAIRS)
    chat = write_jsonl(
        tmp_path,
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        "chat.jsonl",
    )
    with pytest.raises(DataKindError, match=rf"sft: {chat} \(messages\); preference: {pairs} \(preference\)"):
        prepare(config(tmp_path, [chat, pairs]), tmp_path / "run", log=quiet)
    with pytest.raises(DataKindError, match=rf"preference: {pairs} \(preference\); sft: {chat} \(messages\)"):
        prepare(config(tmp_path, [pairs], eval={"path": str(chat)}), tmp_path / "run", log=quiet)
    with pytest.raises(
        DataKindError, match=rf"data.packing: true cannot pack preference data \({pairs} \(preference\)\)"
    ):
        prepare(config(tmp_path, [pairs], packing=True), tmp_path / "run", log=quiet)


def test_fingerprint_changes_with_the_format(tmp_path):
    path = write_jsonl(tmp_path, PAIRS)
    auto = config(tmp_path, [path])
    explicit = RunConfig.model_validate(
        {
            **auto.model_dump(mode="json"),
            "data": {**auto.data.model_dump(mode="json"), "train": [{"path": str(path), "format": "preference"}]},
        }
    )
    assert fingerprint(auto) != fingerprint(explicit)
    logs = []
    prepare(auto, tmp_path / "run", log=logs.append)
    prepare(explicit, tmp_path / "run", log=logs.append)
    assert "data: preparing again, changed since the cached data: data config" in logs


def test_data_preview_shows_prompt_chosen_and_rejected_with_trained_tokens_marked(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(shared_path("tokenizers/qwen2.5"))},
                "data": {"train": [{"path": str(write_jsonl(tmp_path, PAIRS[:1]))}], "max_seq_len": 128},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["data", "preview", str(cfg), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "--- row 0: prompt 36 tokens, chosen 2, rejected 7 trained ---" in out
    assert (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n\n"
        "--- chosen:\n[[Paris<|im_end|>]]\n--- rejected:\n[[Lyon, I think.<|im_end|>]]"
    ) in out
    assert datasets.load_from_disk(str(tmp_path / "run" / "data" / "train"))[0]["chosen"] == "Paris"


def test_dedup_is_on_prompt_and_chosen_and_decontamination_on_both_completions(tmp_path):
    words = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    rows = [
        {"prompt": "Tell me about foxes.", "chosen": "Foxes are clever.", "rejected": "No idea."},
        {"prompt": "Tell me about foxes.", "chosen": "Foxes are clever!", "rejected": "Ask someone else."},  # dup
        {"prompt": "Tell me about foxes.", "chosen": "Foxes are small canids.", "rejected": "No idea."},  # kept
        {"prompt": "Describe a scene.", "chosen": "A calm morning.", "rejected": words},  # contaminated
    ]
    evals = [{"prompt": "Say something.", "chosen": "Hello there.", "rejected": words}]
    data = prepare(
        config(tmp_path, [write_jsonl(tmp_path, rows)], eval={"path": str(write_jsonl(tmp_path, evals, "eval.jsonl"))}),
        tmp_path / "run",
        log=quiet,
    )
    assert data.report["dedup"]["exact_removed"] == 1 and data.report["decontamination"]["removed"] == 1
    assert data.train["chosen"] == ["Foxes are clever.", "Foxes are small canids."]
    assert data.train["source_row"] == [0, 2] and len(data.eval) == 1
    assert data.report["eval"]["pairs"] == 1


def test_row_preview_of_a_kto_row_marks_the_completion_and_says_its_label():
    from transformers import AutoTokenizer

    from tuneforge.data.preview import row_preview

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers/qwen2.5")))
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    completion = tok("Berlin<|im_end|>", add_special_tokens=False)["input_ids"]
    row = {"prompt_ids": prompt, "completion_ids": completion, "label": False}
    assert row_preview(tok, row, 3, color=False) == (
        f"\n--- row 3: prompt {len(prompt)} tokens, completion 2 trained, label undesirable ---\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n\n--- completion:\n[[Berlin<|im_end|>]]"
    )
    assert "\x1b[1;32mBerlin<|im_end|>\x1b[0m" in row_preview(tok, {**row, "label": True}, 0, color=True)


def test_blocks_of_rows_give_the_same_pairs(tmp_path, monkeypatch):
    from tuneforge.data import pair_encode

    rows = [*PAIRS, {"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "It is paint."}]
    path = write_jsonl(tmp_path, rows)
    whole = prepare(config(tmp_path, [path]), tmp_path / "whole", log=quiet)
    monkeypatch.setattr(pair_encode, "BLOCK_ROWS", 2)
    blocks = prepare(config(tmp_path, [path]), tmp_path / "blocks", log=quiet)
    for c in ("prompt_ids", "chosen_ids", "rejected_ids", "num_tokens", "source_row"):
        assert blocks.train[c] == whole.train[c]
    assert len(blocks.train) == 3
    assert blocks.report["train"] == whole.report["train"]
