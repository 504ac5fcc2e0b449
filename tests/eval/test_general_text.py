"""eval.general_text, the forgetting check: perplexity on text the user names, before and after training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tuneforge.cli import main
from tuneforge.eval.general_text import GeneralTextError, forgetting_line, general_text_perplexity, general_text_windows


class _Chars:
    """A character tokenizer: one id per character (ord % 97), so windows are easy to count."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_windows_cut_the_first_tokens_into_max_seq_len_pieces(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 3, encoding="utf-8")
    windows = general_text_windows(f, _Chars(), max_tokens=25, window=10)
    assert [len(w) for w in windows] == [10, 10, 5]
    assert windows[0] == [ord(c) % 97 for c in "abcdefghij"]
    assert [len(w) for w in general_text_windows(f, _Chars(), 21, 10)] == [10, 10]  # a 1-token tail is dropped


@pytest.mark.parametrize(
    "content,message",
    [(None, "does not exist"), (b"\xff\xfe bad", "is not UTF-8 text (byte 0)"), (b"a", "holds no text to score")],
)
def test_unusable_text_is_a_clear_error(tmp_path, content, message):
    f = tmp_path / "t.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(GeneralTextError) as e:
        general_text_windows(f, _Chars(), 100, 10)
    assert str(f) in str(e.value) and message in str(e.value)


def test_perplexity_is_token_weighted_over_every_window_position():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    windows = [list(range(3, 13)), list(range(20, 25))]  # 9 + 4 predicted positions
    got = general_text_perplexity(model, windows, batch_size=2, pad_id=0)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
    assert got["general_tokens"] == 13
    assert got["general_loss"] == pytest.approx(total / 13, rel=1e-5)
    assert got["general_ppl"] == pytest.approx(math.exp(total / 13), rel=1e-5)
    assert model.training is False


def test_forgetting_line():
    line = forgetting_line({"general_ppl": 20.0}, {"general_ppl": 21.0, "general_tokens": 16384}, "x/wiki.txt")
    assert line == "forgetting check: perplexity on wiki.txt 20.00 -> 21.00 (+5.0%) over 16,384 tokens"
    assert forgetting_line({}, {"general_ppl": 1.0}, None) is None


def test_train_scores_it_before_and_after_and_reports_it(tiny_config_dict, tmp_path, capsys):
    text = tmp_path / "general.txt"
    text.write_text("Reverse the order of these words. " * 40, encoding="utf-8")
    tiny_config_dict["eval"] = {
        "at_start": True,
        "show_samples": 0,
        "general_text": str(text),
        "general_text_tokens": 200,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    run = Path(tiny_config_dict["output"]["dir"])
    summary = json.loads((run / "run_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["general_tokens"] == after["general_tokens"] == 200 - 4  # 4 windows of 64, 64, 64, 8 tokens
    assert before["general_ppl"] != after["general_ppl"]
    assert "general_ppl" in out and forgetting_line(before, after, str(text)) in out
    assert "Forgetting check: perplexity on general.txt" in (run / "report.md").read_text()


def test_a_missing_general_text_stops_train_before_anything_is_written(tiny_config_dict, tmp_path, capsys):
    tiny_config_dict["eval"]["general_text"] = str(tmp_path / "nope.txt")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["train", str(path)]) == 2
    assert f"eval.general_text: {tmp_path / 'nope.txt'} does not exist" in capsys.readouterr().err
    assert not Path(tiny_config_dict["output"]["dir"]).exists()
