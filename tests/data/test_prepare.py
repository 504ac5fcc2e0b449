import json

import datasets

from tests.conftest import shared_path
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import prepare
from tuneforge.data.templates import IGNORE_INDEX


def alpaca_cfg(tmp_path, **data):
    return RunConfig.model_validate({
        "model": {"name_or_path": str(shared_path("tokenizers/llama2"))},
        "data": {"train": [{"path": str(shared_path("instruct/alpaca_en_demo.json")), "max_rows": 40}],
                 "eval_fraction": 0.25, "max_seq_len": 256, **data},
        "output": {"dir": str(tmp_path / "run")},
    })


def test_prepare_writes_load_from_disk_dataset_and_report(tmp_path):
    cfg = alpaca_cfg(tmp_path)
    out = prepare(cfg, tmp_path / "run", log=lambda s: None)
    train = datasets.load_from_disk(str(tmp_path / "run" / "data" / "train"))
    assert {"input_ids", "labels"} <= set(train.column_names)
    report = json.loads((tmp_path / "run" / "data" / "data_report.json").read_text())
    assert report["chat_template"] == "alpaca" and report["stop_token_ids"] == [2]
    assert report["train"]["rows"] + report["train"]["dropped_overlong_rows"] + report["train"]["dropped_short_or_untrained_rows"] == 30
    assert report["eval"]["rows_in"] == 10
    assert report["train"]["tokens"] == sum(len(x) for x in train["input_ids"])
    assert report["train"]["trained_tokens"] == sum(sum(1 for v in lab[1:] if v != IGNORE_INDEX) for lab in train["labels"])
    for ids, labels in zip(train["input_ids"], train["labels"]):
        assert len(ids) == len(labels) <= 256
        assert ids[0] == 1 and labels[0] == IGNORE_INDEX  # BOS is never trained
    truncated = report["train"]["truncated_rows"]
    assert truncated == sum(1 for ids in train["input_ids"] if len(ids) == 256) and truncated > 0
    assert out.tokenizer.chat_template  # saved with the training template for generation


def test_overlong_drop_counts_rows(tmp_path):
    cfg = alpaca_cfg(tmp_path, overlong="drop", max_seq_len=128)
    report = prepare(cfg, tmp_path / "run", log=lambda s: None).report["train"]
    assert report["dropped_overlong_rows"] > 0 and report["truncated_rows"] == 0
    assert report["rows"] == 30 - report["dropped_overlong_rows"] - report["dropped_short_or_untrained_rows"]
    assert report["length"]["max"] <= 128


def test_cache_reused_and_rebuilt_when_an_input_changes(tmp_path):
    msgs = []
    cfg = alpaca_cfg(tmp_path)
    assert prepare(cfg, tmp_path / "run", log=msgs.append).reused is False
    assert prepare(cfg, tmp_path / "run", log=msgs.append).reused is True
    assert any("reusing prepared data" in m for m in msgs)
    changed = alpaca_cfg(tmp_path, max_seq_len=300)
    assert prepare(changed, tmp_path / "run", log=msgs.append).reused is False
    assert "data: preparing again, changed since the cached data: data config" in msgs


def test_prepare_command(tmp_path, capsys, tiny_config_dict):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["prepare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train: 56 rows (56 in)" in out and "eval: 8 rows" in out
    ds = datasets.load_from_disk(tiny_config_dict["output"]["dir"] + "/data/train")
    assert len(ds) == 56
    assert (tmp_path / "run" / "config.yaml").exists()
