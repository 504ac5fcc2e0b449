import json

import datasets
import pytest

from tests.conftest import shared_path
from tests.data.helpers import plain
from tuneforge.config.schema import DatasetSource
from tuneforge.data.formats import DataFormatError, detect_format, normalize, read_source

ALPACA = [
    {"instruction": "Add.", "input": "1 + 2", "output": "3"},
    {"instruction": "Greet.", "input": "", "output": "Hello!"},
]


def load(src: DatasetSource, skip_invalid=False):
    ds, name, _ = read_source(src, skip_invalid)
    return normalize(ds, src, name, skip_invalid=skip_invalid)[0]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_alpaca_in_every_file_type(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = datasets.Dataset.from_list(ALPACA)
    {
        ".json": lambda: path.write_text(json.dumps(ALPACA)),
        ".jsonl": lambda: frame.to_json(str(path)),
        ".csv": lambda: frame.to_csv(str(path), index=False),
        ".parquet": lambda: frame.to_parquet(str(path)),
    }[suffix]()
    ds = load(DatasetSource(path=str(path)))
    assert ds.column_names == ["messages", "text", "score", "source_row"]
    assert plain(ds[0]["messages"]) == [
        {"role": "user", "content": "Add.\n\n1 + 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert plain(ds[1]["messages"])[0] == {"role": "user", "content": "Greet."}


def test_saved_dataset_dict_directory_and_split(tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA[:1])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(load(DatasetSource(path=str(tmp_path / "dd"), split="test"))) == 1
    with pytest.raises(DataFormatError, match=r"no split 'valid'; it has \['test', 'train'\]"):
        load(DatasetSource(path=str(tmp_path / "dd"), split="valid"))


def test_messages_sharegpt_completion_and_column_mapping(tmp_path):
    rows = [
        {
            "chat": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
            ]
        }
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    ds = load(DatasetSource(path=str(tmp_path / "m.json"), columns={"messages": "chat"}))
    assert [m["role"] for m in ds[0]["messages"]] == ["system", "user", "assistant"]

    (tmp_path / "s.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    )
    ds = load(DatasetSource(path=str(tmp_path / "s.json")))
    assert plain(ds[0]["messages"]) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]

    (tmp_path / "t.jsonl").write_text('{"body": "raw text"}\n')
    ds = load(DatasetSource(path=str(tmp_path / "t.jsonl"), columns={"text": "body"}))
    assert ds[0] == {"messages": [], "text": "raw text", "score": None, "source_row": 0}


def test_bad_row_error_names_file_and_row(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "narrator", "value": "?"}]},
    ]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"bad.json:1: unknown speaker 'narrator'"):
        load(DatasetSource(path=str(tmp_path / "bad.json")))


def test_row_without_assistant_turn_is_rejected(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(DataFormatError, match=r"m.json:1: the row has no assistant turn"):
        load(DatasetSource(path=str(tmp_path / "m.json")))


def test_undetectable_format_and_missing_columns(tmp_path):
    with pytest.raises(DataFormatError, match=r"^data: cannot tell the data format from its columns \['a', 'b'\]"):
        detect_format(["a", "b"])
    (tmp_path / "q.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(
        DataFormatError,
        match=r"format 'alpaca' needs column\(s\) \['instruction', 'output'\].*columns: \{instruction: your_column\}",
    ):
        load(DatasetSource(path=str(tmp_path / "q.json"), format="alpaca"))
    with pytest.raises(DataFormatError, match="data file not found"):
        load(DatasetSource(path=str(tmp_path / "missing.json")))


def test_real_shared_files():
    alpaca = load(DatasetSource(path=str(shared_path("instruct/alpaca_en_demo.json"))))
    assert len(alpaca) == 999
    sharegpt = load(DatasetSource(path=str(shared_path("chat/dummy_conversation.json")), max_rows=50))
    assert len(sharegpt) == 50 and sharegpt[0]["messages"][0]["role"] in {"user", "system"}
