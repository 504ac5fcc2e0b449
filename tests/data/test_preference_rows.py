"""Preference pairs and KTO rows: read, normalised, checked (data/preference.py through formats.normalize)."""

import json

import pytest

from tests.conftest import shared_path
from tests.data.helpers import plain
from tuneforge.config.schema import DatasetSource
from tuneforge.data.formats import DataFormatError, normalize, read_source_located
from tuneforge.data.preference import DataKindError, prepared_kind, run_kind
from tuneforge.data.sources import read_normalized


def read(path, skip_invalid=False, **src):
    source = DatasetSource(path=str(path), **src)
    ds, name, _, locate = read_source_located(source, skip_invalid)
    return normalize(ds, source, name, skip_invalid=skip_invalid, locate=locate)


def write_jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


U = {"role": "user", "content": "What is the capital of France?"}


def test_prompt_chosen_rejected_strings_and_message_lists(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Lyon", "system": "Be brief."},
            {
                "prompt": [U, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Madrid"}]}],
                "rejected": [{"role": "assistant", "content": "Rome"}],
            },
        ],
    )
    rows, invalid = read(path)
    assert invalid["format"] == "preference" and invalid["skipped"] == 0
    assert set(rows.column_names) == {"messages", "text", "score", "source_row", "chosen", "rejected"}
    assert plain(rows[0]["messages"]) == [{"role": "system", "content": "Be brief."}, U]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("Paris", "Lyon")
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "user"]
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("Madrid", "Rome")


def test_sharegpt_pairs_inline_and_the_shared_demo_file(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            {
                "conversations": [{"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "hello"},
                "rejected": {"from": "gpt", "value": "go away"},
            }
        ],
    )
    rows, invalid = read(path)
    assert invalid["format"] == "preference"
    assert plain(rows[0]["messages"]) == [{"role": "user", "content": "hi"}]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("hello", "go away")

    rows, invalid = read(shared_path("preference/dpo_en_demo.json"))
    assert (invalid["format"], invalid["skipped"], len(rows)) == ("preference", 0, 300)
    assert rows[0]["messages"][0]["content"].startswith("Hi! I'd like to create a new language game")
    assert rows[0]["chosen"].startswith("That sounds like a fun and engaging idea")
    assert rows[0]["rejected"].startswith("Hello! I'd be happy to help you create a")


def test_hh_transcripts_split_at_the_last_assistant_turn(tmp_path):
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell a joke"
    path = write_jsonl(tmp_path, [{"chosen": head + "\n\nAssistant: A pun.", "rejected": head + "\n\nAssistant: No."}])
    rows, _ = read(path)
    assert plain(rows[0]["messages"]) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell a joke"},
    ]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("A pun.", "No.")


def test_hh_shared_file_is_read_from_gzip_with_its_bad_pairs_counted():
    path = shared_path("preference/harmless-base_test.jsonl.gz")
    rows, invalid = read(path, skip_invalid=True)
    assert invalid["format"] == "preference" and len(rows) == 2303 and invalid["skipped"] == 9
    assert invalid["reasons"] == {
        "`chosen` is an empty completion, so nothing would be trained": 4,
        "the prompts of `chosen` and `rejected` do not match (the transcripts differ before their last assistant "
        "turn; a pair needs one shared prompt)": 5,
    }
    assert invalid["examples"][0] == f"{path}:87: `chosen` is an empty completion, so nothing would be trained"
    assert plain(rows[0]["messages"])[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert rows[1]["chosen"].endswith("using mindfulness, in the moment, to calm down.")
    with pytest.raises(DataFormatError, match=rf"{path}:87: `chosen` is an empty completion.*8 more invalid rows"):
        read(path)


def test_kto_rows_inline_and_the_shared_demo_file(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            {"messages": [U, {"role": "assistant", "content": "Paris"}], "label": True},
            {"messages": [U, {"role": "assistant", "content": "Berlin"}], "label": False},
        ],
    )
    rows, invalid = read(path)
    assert invalid["format"] == "kto"
    assert {**rows[:], "messages": [plain(m) for m in rows["messages"]]} == {
        "messages": [[U], [U]],
        "text": ["", ""],
        "score": [None, None],
        "source_row": [0, 1],
        "completion": ["Paris", "Berlin"],
        "label": [True, False],
    }
    rows, invalid = read(shared_path("chat/kto_en_demo.json"))
    assert (invalid["format"], len(rows), sum(rows["label"])) == ("kto", 300, 150)
    assert all(m[-1]["role"] == "user" for m in rows["messages"])


BAD = [
    {"prompt": "q", "chosen": "a", "rejected": "b"},  # line 1: good
    {"prompt": "q", "chosen": "same", "rejected": "same"},  # 2
    {"prompt": "q", "chosen": "  ", "rejected": "b"},  # 3
    {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},  # 4
    {"prompt": "q", "chosen": 3, "rejected": "b"},  # 5
    {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # 6
    {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},  # 7
]


@pytest.mark.parametrize(
    "line, message",
    [
        (2, "`chosen` and `rejected` are the same reply, so the pair prefers nothing"),
        (3, "`chosen` is an empty completion, so nothing would be trained"),
        (4, "the prompts of `chosen` and `rejected` do not match .*: they differ at turn 1"),
        (5, r"`chosen` must be a string, a message or a list of messages, got a number \(3\)"),
        (6, r"`chosen` must be one assistant reply, got roles \['user'\]"),
        (7, "the prompt .* has no user turn"),
    ],
)
def test_each_malformed_pair_is_an_error_with_its_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path, [BAD[0], BAD[line - 1]])
    with pytest.raises(DataFormatError, match=rf"{path}:2: {message}.*skip_invalid"):
        read(path)


def test_malformed_pairs_are_counted_skips_within_max_invalid_fraction(tmp_path):
    from tuneforge.config.schema import DataConfig

    path = write_jsonl(tmp_path, BAD)
    src = DatasetSource(path=str(path))
    rows, source = read_normalized(
        src, DataConfig(train=[src], skip_invalid=True, max_invalid_fraction=1.0), {}, source_id=0
    )
    assert len(rows) == 1 and source["rows_invalid"] == 6 and source["rows_read"] == 7
    assert [e.split(": ")[0] for e in source["invalid"]["examples"]] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    with pytest.raises(DataFormatError, match=r"6 of 7 rows are invalid \(86%\), more than data.max_invalid_fraction"):
        read_normalized(src, DataConfig(train=[src], skip_invalid=True), {}, source_id=0)


def test_kto_label_must_be_a_boolean(tmp_path):
    good = {"messages": [U, {"role": "assistant", "content": "Paris"}], "label": True}
    for label, got in (("yes", r'a string \("yes"\)'), (1, r"a number \(1\)"), (None, "null")):
        path = write_jsonl(tmp_path, [good, {**good, "label": label}])
        message = rf"{path}:2: `label` must be a boolean \(true: desirable, false: undesirable\), got {got}"
        with pytest.raises(DataFormatError, match=message):
            read(path, format="kto")
    path = write_jsonl(tmp_path, [good, {"messages": [U], "label": True}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: the last message of `messages` must be the assistant"):
        read(path)


def test_one_kind_per_run_and_no_packing_of_pairs():
    sft = {"source": "chat.jsonl", "format": "messages"}
    pairs = {"source": "pairs.jsonl", "format": "preference"}
    assert run_kind([sft]) == "sft" and run_kind([pairs, pairs]) == "preference"
    with pytest.raises(DataKindError, match=r"sft: chat.jsonl \(messages\); preference: pairs.jsonl \(preference\)"):
        run_kind([sft, pairs])
    with pytest.raises(DataKindError, match=r"data.packing: true cannot pack kto data \(k.json \(kto\)\)"):
        run_kind([{"source": "k.json", "format": "kto"}], packing=True)
    assert prepared_kind({}) == "sft" and prepared_kind({"kind": "kto"}) == "kto"


def test_explicit_pair_format_with_packing_is_a_config_error():
    from pydantic import ValidationError

    from tuneforge.config.schema import DataConfig

    with pytest.raises(ValidationError, match="data.packing: true cannot pack preference or KTO data"):
        DataConfig(train=[{"path": "p.jsonl", "format": "preference"}], packing=True)


def test_transcripts_as_message_lists_share_their_prompt(tmp_path):
    reply = {"role": "assistant", "content": "Paris"}
    path = write_jsonl(tmp_path, [{"chosen": [U, reply], "rejected": [U, {**reply, "content": "Rome"}]}])
    rows, invalid = read(path)
    assert invalid["format"] == "preference"
    assert {**rows[:], "messages": [plain(m) for m in rows["messages"]]} == {
        "messages": [[U]],
        "text": [""],
        "score": [None],
        "source_row": [0],
        "chosen": ["Paris"],
        "rejected": ["Rome"],
    }
    other = {"role": "user", "content": "What is the capital of Italy?"}
    path = write_jsonl(tmp_path, [{"chosen": [U, reply], "rejected": [other, {**reply, "content": "Rome"}]}])
    with pytest.raises(DataFormatError, match=rf"{path}:1: the prompts of `chosen` and `rejected` do not match"):
        read(path)
