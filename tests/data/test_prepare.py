import json

import datasets

from tests.conftest import shared_path
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import prepare
from tuneforge.data.templates import IGNORE_INDEX


def alpaca_cfg(tmp_path, **data):
    return RunConfig.model_validate(
        {
            "model": {"name_or_path": str(shared_path("tokenizers/llama2"))},
            "data": {
                "train": [{"path": str(shared_path("instruct/alpaca_en_demo.json")), "max_rows": 40}],
                "eval_fraction": 0.25,
                "max_seq_len": 256,
                **data,
            },
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def test_prepare_writes_load_from_disk_dataset_and_report(tmp_path):
    cfg = alpaca_cfg(tmp_path)
    out = prepare(cfg, tmp_path / "run", log=lambda s: None)
    train = datasets.load_from_disk(str(tmp_path / "run" / "data" / "train"))
    assert {"input_ids", "labels"} <= set(train.column_names)
    report = json.loads((tmp_path / "run" / "data" / "data_report.json").read_text())
    assert report["chat_template"] == "alpaca" and report["stop_token_ids"] == [2]
    assert (
        report["train"]["rows"]
        + report["train"]["dropped_overlong_rows"]
        + report["train"]["dropped_short_or_untrained_rows"]
        == 30
    )
    assert report["eval"]["rows_in"] == 10
    assert report["train"]["tokens"] == sum(len(x) for x in train["input_ids"])
    assert report["train"]["trained_tokens"] == sum(
        sum(1 for v in lab[1:] if v != IGNORE_INDEX) for lab in train["labels"]
    )
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
    png = (tmp_path / "run" / "data" / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def write_cfg(tmp_path, train_path, **data):
    return RunConfig.model_validate(
        {
            "model": {"name_or_path": str(shared_path("tokenizers/qwen2.5"))},
            "data": {"train": [{"path": str(train_path)}], "max_seq_len": 128, **data},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def test_malformed_json_line_names_the_line_or_is_skipped_and_counted(tmp_path):
    import pytest

    from tuneforge.data.formats import DataFormatError

    path = tmp_path / "chat.jsonl"
    path.write_text(f'{GOOD}\n{{"messages": [oops\n{GOOD}\n')
    with pytest.raises(DataFormatError, match=r"chat.jsonl:2: invalid JSON .*skip_invalid"):
        prepare(write_cfg(tmp_path, path), tmp_path / "run", log=lambda s: None)
    cfg = write_cfg(tmp_path, path, skip_invalid=True, max_invalid_fraction=0.5)
    report = prepare(cfg, tmp_path / "run", log=lambda s: None).report
    assert report["invalid"]["skipped"] == 1 and report["invalid"]["reasons"] == {"unreadable line": 1}
    assert "chat.jsonl:2: invalid JSON" in report["invalid"]["examples"][0]
    assert report["train"]["rows"] == 1  # the second good row is an exact duplicate of the first


def test_non_utf8_empty_file_bad_role_and_no_assistant(tmp_path):
    import pytest

    from tuneforge.data.formats import DataFormatError

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(GOOD.encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=r"latin.jsonl:2: not UTF-8 text .*re-save the file as UTF-8"):
        prepare(write_cfg(tmp_path, latin), tmp_path / "run", log=lambda s: None)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty.json: the file is empty"):
        prepare(write_cfg(tmp_path, empty), tmp_path / "run", log=lambda s: None)
    roles = tmp_path / "roles.jsonl"
    roles.write_text(
        GOOD
        + "\n"
        + GOOD.replace('"user"', '"narrator"')
        + "\n"
        + '{"messages": [{"role": "user", "content": "only a question"}]}\n'
    )
    with pytest.raises(
        DataFormatError,
        match=r"roles.jsonl:2: unknown role 'narrator'.* \(1 more invalid rows in "
        r".*roles.jsonl, the next at .*roles.jsonl:3\)",
    ):
        prepare(write_cfg(tmp_path, roles), tmp_path / "run", log=lambda s: None)
    cfg = write_cfg(tmp_path, roles, skip_invalid=True, max_invalid_fraction=0.7)
    report = prepare(cfg, tmp_path / "run", log=lambda s: None).report
    assert report["invalid"]["skipped"] == 2
    assert set(report["invalid"]["reasons"]) == {
        "unknown role 'narrator'",
        "the row has no assistant turn, so nothing would be trained",
    }


def test_nothing_left_after_filtering_is_a_clear_error(tmp_path):
    import pytest

    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD.replace('"hello"', '""') + "\n")
    with pytest.raises(ValueError, match="no training rows left after filtering"):
        prepare(write_cfg(tmp_path, path), tmp_path / "run", log=lambda s: None)


def test_cache_rebuilds_on_file_tokenizer_and_template_changes(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD + "\n")
    msgs = []
    log = msgs.append
    cfg = write_cfg(tmp_path, path)
    prepare(cfg, tmp_path / "run", log=log)
    assert prepare(cfg, tmp_path / "run", log=log).reused
    path.write_text(GOOD.replace("hello", "hello there") + "\n")
    assert not prepare(cfg, tmp_path / "run", log=log).reused
    assert msgs[-2] == f"data: preparing again, changed since the cached data: file {path}"
    other_tok = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"tokenizer": str(shared_path("tokenizers/llama3"))})}
    )
    assert not prepare(other_tok, tmp_path / "run", log=log).reused
    assert msgs[-2] == "data: preparing again, changed since the cached data: tokenizer"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    tcfg = write_cfg(tmp_path, path, chat_template=str(template))
    prepare(tcfg, tmp_path / "run", log=log)
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}")
    assert not prepare(tcfg, tmp_path / "run", log=log).reused
    assert msgs[-2] == "data: preparing again, changed since the cached data: chat template file"


def test_mixing_samples_per_source_down_and_up(tmp_path, tiny_config_dict):
    d = dict(tiny_config_dict)
    d["data"] = {
        "train": [
            {"synthetic": {"task": "reverse_words", "rows": 40, "seed": 0}, "samples": 10},
            {"synthetic": {"task": "add", "rows": 20, "seed": 0}, "samples": 50},
        ],
        "max_seq_len": 64,
        "dedup": {"exact": False},
    }
    cfg = RunConfig.model_validate(d)
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    assert data.report["mixing"] == [10, 50]
    assert [s["rows_trained"] for s in data.report["sources"]] == [10, 50]
    assert len(data.train) == 60
    source_ids = data.train["source_id"]
    assert source_ids.count(0) == 10 and source_ids.count(1) == 50
    adds = [m[0]["content"] for m, s in zip(data.train["messages"], source_ids) if s == 1]
    assert len(set(adds)) == 20  # 50 = 2 full repeats of the 20 rows + a sample of 10


def test_data_preview_marks_exactly_the_trained_tokens(tmp_path, capsys):
    import yaml

    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(shared_path("tokenizers/qwen2.5"))},
                "data": {"train": [{"path": str(path)}], "max_seq_len": 128},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["data", "preview", str(cfg), "--rows", "5", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 training rows (trained tokens between [[ and ]]):" in out
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n[[hello<|im_end|>]]\n" in out
    assert main(["data", "preview", str(cfg), "--color", "always"]) == 0
    assert "\x1b[1;32mhello<|im_end|>\x1b[0m" in capsys.readouterr().out


def test_histogram_child_process_and_collector_state(tmp_path, monkeypatch):
    import gc

    from tuneforge.data import histogram

    wait = histogram.start_length_histogram([3, 5, 5, 9], 16, tmp_path / "child.png", "training samples (4)")
    wait()
    png = (tmp_path / "child.png").read_bytes()
    histogram.write_length_histogram([3, 5, 5, 9], 16, tmp_path / "here.png", "training samples (4)")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (tmp_path / "here.png").read_bytes()  # the same picture

    def no_fork(method):
        raise ValueError(f"cannot find context for {method!r}")

    monkeypatch.setattr("multiprocessing.get_context", no_fork)  # no fork here: drawn in this process
    assert histogram.start_length_histogram([1, 2], 8, tmp_path / "inline.png", "t") is not None
    assert (tmp_path / "inline.png").exists()
    monkeypatch.undo()
    frozen = gc.get_freeze_count()
    prepare(alpaca_cfg(tmp_path), tmp_path / "run", log=lambda s: None)
    assert gc.get_freeze_count() == frozen == 0  # the stage gives the collector its objects back
