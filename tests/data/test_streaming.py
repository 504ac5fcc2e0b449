"""data.streaming: raw-text corpora prepared chunk by chunk give the same rows as the in-memory path."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from tests.conftest import shared_path
from tuneforge.config.schema import RunConfig
from tuneforge.data.formats import DataFormatError
from tuneforge.data.prepare import prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
CONTAMINATED = "the eval sentence appears here in full and is contaminated for sure"


@pytest.fixture
def corpus(tmp_path):
    r = random.Random(0)
    rows = [{"text": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 80))) + f" row {i}."} for i in range(450)]
    rows.insert(100, {"text": rows[5]["text"].upper()})  # exact duplicate after normalisation
    rows.insert(300, {"text": "  " + rows[7]["text"] + " "})  # another
    rows.insert(200, {"text": CONTAMINATED})  # overlaps the eval file
    rows.insert(250, {"text": "x"})  # too short for the quality filter
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": CONTAMINATED}) + "\n")
    return tmp_path


def _cfg(root, name, **data) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "init": {
                    "architecture": "llama",
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "max_position_embeddings": 128,
                },
                "tokenizer": str(shared_path("tokenizers/gpt2")),
            },
            "data": {
                "train": [{"path": str(root / "train.jsonl")}],
                "eval": {"path": str(root / "eval.jsonl")},
                "max_seq_len": 64,
                "quality": {"min_response_chars": 5},
                **data,
            },
            "output": {"dir": str(root / name)},
        }
    )


def test_streamed_rows_equal_the_in_memory_ones(corpus):
    whole = prepare(_cfg(corpus, "whole"), corpus / "whole", log=lambda s: None)
    streamed = prepare(
        _cfg(corpus, "stream", streaming=True, stream_chunk_rows=100), corpus / "stream", log=lambda s: None
    )
    assert streamed.train["input_ids"] == whole.train["input_ids"]
    assert streamed.train["labels"] == whole.train["labels"]
    assert streamed.train["num_trained"] == whole.train["num_trained"]
    rs, rw = streamed.report, whole.report
    assert rs["dedup"]["exact_removed"] == rw["dedup"]["exact_removed"] == 2
    assert rs["decontamination"]["removed"] == rw["decontamination"]["removed"] == 1
    assert rs["quality"]["min_response_chars"]["removed"] == rw["quality"]["min_response_chars"]["removed"] == 1
    for key in ("rows", "tokens", "trained_tokens", "truncated_rows", "length"):
        assert rs["train"][key] == rw["train"][key], key
    assert rs["train"]["streamed"] and rs["sources"][0]["rows_read"] == 454 and rs["sources"][0]["rows_trained"] == 450


def test_streamed_packing_keeps_every_sample_whole_within_its_chunk(corpus):
    data = prepare(
        _cfg(corpus, "packed", streaming=True, stream_chunk_rows=100, packing=True),
        corpus / "packed",
        log=lambda s: None,
    )
    rep = data.report["train"]["packing"]
    assert rep["samples"] == 450 and rep["efficiency"] > 0.9
    seen = 0
    for row in data.train:
        assert len(row["input_ids"]) <= 64 and sum(row["seq_lens"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            assert row["labels"][start] == -100  # a sample's first token is never a target of the previous one
            start += n
        seen += len(row["seq_lens"])
    assert seen == 450
    assert isinstance(datasets.load_from_disk(str(corpus / "packed" / "data" / "train")), datasets.Dataset)


def test_a_bad_row_names_the_file_and_row_or_is_skipped(corpus):
    bad = corpus / "train.jsonl"
    bad.write_text(bad.read_text() + json.dumps({"text": 42}) + "\n")
    with pytest.raises(
        DataFormatError,
        match=r"train.jsonl:455: field `text` must be a string, got a number \(42\); "
        r"fix the row, or set data.skip_invalid: true",
    ):
        prepare(_cfg(corpus, "bad", streaming=True), corpus / "bad", log=lambda s: None)
    data = prepare(_cfg(corpus, "skip", streaming=True, skip_invalid=True), corpus / "skip", log=lambda s: None)
    assert data.report["invalid"]["skipped"] == 1


def test_streaming_refuses_what_needs_the_whole_corpus(corpus):
    with pytest.raises(
        ValueError,
        match=r"data.streaming=true cannot be combined with data.dedup.near .*; "
        r"data.eval_fraction",
    ):
        RunConfig.model_validate(
            {
                "model": {"name_or_path": "x"},
                "data": {
                    "train": [{"path": "a.jsonl"}],
                    "streaming": True,
                    "eval_fraction": 0.1,
                    "dedup": {"near": True},
                },
            }
        )


def test_streamed_rows_get_the_same_checks_and_the_invalid_share_stops_the_run(corpus):
    path = corpus / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[9] = json.dumps({"text": None})  # line 10: null
    lines[19] = json.dumps({"body": "other field"})  # line 20: no `text`
    lines[29] = json.dumps({"text": ["a", "list"]})  # line 30
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as e:
        prepare(_cfg(corpus, "strict", streaming=True), corpus / "strict", log=lambda s: None)
    assert str(e.value) == (
        f"{path}:10: missing field `text` (absent or null): every completion row needs it as a "
        "string; fix the row, or set data.skip_invalid: true to skip such rows (counted in the "
        "data report)"
    )
    data = prepare(_cfg(corpus, "skip", streaming=True, skip_invalid=True), corpus / "skip", log=lambda s: None)
    inv = data.report["invalid"]
    assert inv["skipped"] == 3 and data.report["sources"][0]["rows_invalid"] == 3
    assert inv["examples"][2] == f'{path}:30: field `text` must be a string, got a list (["a", "list"])'
    assert inv["examples"][1].startswith(f"{path}:20: missing field `text`")
    with pytest.raises(
        DataFormatError,
        match=r"train.jsonl: 3 of 454 rows are invalid \(1%\), more than "
        r"data.max_invalid_fraction=0.005 of a source",
    ):
        prepare(
            _cfg(corpus, "share", streaming=True, skip_invalid=True, max_invalid_fraction=0.005),
            corpus / "share",
            log=lambda s: None,
        )


def test_streamed_csv_values_stay_text_with_their_lines(tmp_path):
    from tuneforge.config.schema import DatasetSource
    from tuneforge.data.streaming import stream_texts

    path = tmp_path / "s.csv"
    path.write_text('text\n42\n\nhello there\n"a, b"\n')
    rows = [(locate(i), row) for locate, i, row in stream_texts(DatasetSource(path=str(path)))]
    assert rows == [
        (f"{path}:2", {"text": "42"}),
        (f"{path}:4", {"text": "hello there"}),
        (f"{path}:5", {"text": "a, b"}),
    ]
