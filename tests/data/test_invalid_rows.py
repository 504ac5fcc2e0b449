"""Malformed rows (issue 21): a field of the wrong type or missing, a row of another format, a row the chat
template refuses is an invalid row: an error naming its file:line and the field, or, with data.skip_invalid,
skipped and counted; never stringified into training text. Too many of them in one source stop the run."""

from __future__ import annotations

import json

import pytest

from tests.data.helpers import plain as stored_plain
from tuneforge.config.schema import DatasetSource, RunConfig
from tuneforge.data.formats import DataFormatError, normalize, read_source
from tuneforge.data.prepare import prepare

HINT = "; fix the row, or set data.skip_invalid: true to skip such rows (counted in the data report)"


def alpaca(i: int) -> dict:
    return {
        "instruction": f"Spell the number {i} in words, please.",
        "input": "",
        "output": f"It is number {i} indeed.",
    }


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(path, skip_invalid=False, **source):
    src = DatasetSource(path=str(path), **source)
    ds, name, _ = read_source(src, skip_invalid)
    return normalize(ds, src, name, skip_invalid=skip_invalid)


def run_cfg(tmp_path, path, **data) -> RunConfig:
    """A run on a file with a new tiny model and its own tokenizer (no shared data needed)."""
    return RunConfig.model_validate(
        {
            "model": {
                "init": {
                    "architecture": "llama",
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "max_position_embeddings": 128,
                    "tokenizer_vocab_size": 300,
                }
            },
            "data": {"train": [{"path": str(path)}], "max_seq_len": 96, **data},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


# ---------------------------------------------------------------------------- wrong types, missing fields
WRONG = [
    ({"instruction": 42, "output": "b"}, "field `instruction` must be a string, got a number (42)"),
    ({"instruction": "a", "output": ["a", "b"]}, 'field `output` must be a string, got a list (["a", "b"])'),
    (
        {"instruction": None, "output": "b"},
        "missing field `instruction` (absent or null): every alpaca row needs it as a string",
    ),
    ({"instruction": "a", "output": {"x": 1}}, 'field `output` must be a string, got an object ({"x": 1})'),
    ({"instruction": "a", "input": 7.5, "output": "b"}, "field `input` must be a string, got a number (7.5)"),
    ({"instruction": "a", "output": "b", "system": True}, "field `system` must be a string, got a boolean (true)"),
    ({"instruction": "a"}, "missing field `output` (absent or null): every alpaca row needs it as a string"),
]


@pytest.mark.parametrize("bad,message", WRONG, ids=[m.split(" (")[0] for _, m in WRONG])
def test_a_wrong_or_missing_alpaca_field_is_an_invalid_row(tmp_path, bad, message):
    rows = [alpaca(i) for i in range(30)]
    rows.insert(11, bad)  # line 12
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        load(path)
    assert str(e.value) == f"{path}:12: {message}{HINT}"
    ds, invalid = load(path, skip_invalid=True)
    assert len(ds) == 30 and invalid["skipped"] == 1 and invalid["examples"] == [f"{path}:12: {message}"]
    assert invalid["format"] == "alpaca"
    assert all(m[-1]["content"].startswith("It is number") for m in ds["messages"])  # nothing stringified


CHAT_WRONG = [
    (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
        "`messages[0].content` must be a string or a list of text parts, got a number (5)",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
        "`messages[1].content` is missing or null: every message needs its content as a string or a list of text parts",
    ),
    (
        {"messages": [{"role": 1, "content": "a"}, {"role": "assistant", "content": "b"}]},
        "`messages[0].role` must be a string, got a number (1)",
    ),
    ({"messages": "hello"}, '`messages` must be a non-empty list of {role, content}, got a string ("hello")'),
    ({"messages": [["user", "a"]]}, '`messages[0]` must be an object {role, content}, got a list (["user", "a"])'),
]


@pytest.mark.parametrize("bad,message", CHAT_WRONG, ids=[f"chat{k}" for k in range(len(CHAT_WRONG))])
def test_a_wrong_chat_field_is_an_invalid_row(tmp_path, bad, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [good, good, bad, good])
    with pytest.raises(DataFormatError) as e:
        load(path)
    assert str(e.value) == f"{path}:3: {message}{HINT}"
    ds, invalid = load(path, skip_invalid=True)
    assert len(ds) == 3 and invalid["skipped"] == 1


def test_sharegpt_and_completion_field_types(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ["y", "o"]}]}
    path = write_jsonl(tmp_path / "s.jsonl", [good, bad])
    with pytest.raises(DataFormatError) as e:
        load(path)
    assert str(e.value) == f'{path}:2: `conversations[1].value` must be a string, got a list (["y", "o"]){HINT}'
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "some raw text"}, {"text": 12}])
    with pytest.raises(DataFormatError) as e:
        load(path)
    assert str(e.value) == f"{path}:2: field `text` must be a string, got a number (12){HINT}"


def test_the_user_field_name_is_named_after_columns_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a."}, {"question": "q2?", "answer": 3}])
    with pytest.raises(DataFormatError, match=r"q.jsonl:2: field `answer` must be a string, got a number \(3\)"):
        load(path, columns={"instruction": "question", "output": "answer"})


# ---------------------------------------------------------------------------- OpenAI content parts
def test_text_content_parts_are_joined_and_image_parts_refused(tmp_path):
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
    }
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [plain, parts])
    ds, invalid = load(path)
    assert stored_plain(ds[1]["messages"]) == [
        {"role": "user", "content": "Describe this."},
        {"role": "assistant", "content": "A cat."},
    ]
    assert invalid["skipped"] == 0

    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": "http://x/c.png"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    path = write_jsonl(tmp_path / "i.jsonl", [plain, parts, image])
    with pytest.raises(DataFormatError) as e:
        load(path)
    assert str(e.value) == (
        f"{path}:3: `messages[0].content[1]` is a content part of type 'image_url': tuneforge "
        f"trains on text only; drop the non-text parts or the row{HINT}"
    )
    ds, invalid = load(path, skip_invalid=True)
    assert len(ds) == 2 and invalid["skipped"] == 1


# ---------------------------------------------------------------------------- format detection over rows
def test_one_stray_row_of_another_format_is_reported_not_the_whole_file(tmp_path):
    rows = [alpaca(i) for i in range(59)]
    rows.insert(40, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})  # line 41
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    message = (
        "the row is a sharegpt row (it has `conversations`), but this source's rows are alpaca (auto-detected "
        "from 59 of its first 60 rows) (a source holds rows of one format: move it to a source of its own)"
    )
    with pytest.raises(DataFormatError) as e:
        prepare(run_cfg(tmp_path, path), tmp_path / "run", log=lambda s: None)
    assert str(e.value) == f"{path}:41: {message}{HINT}"
    data = prepare(run_cfg(tmp_path, path, skip_invalid=True), tmp_path / "run", log=lambda s: None)
    inv = data.report["invalid"]
    assert inv["skipped"] == 1 and inv["examples"] == [f"{path}:41: {message}"]
    assert data.report["sources"][0] | {"rows_trained": 59} == {
        "source": path,
        "format": "alpaca",
        "rows_read": 60,
        "rows_valid": 59,
        "rows_invalid": 1,
        "rows_trained": 59,
    }
    assert data.report["train"]["rows"] == 59


def test_missing_output_is_invalid_not_dropped_by_the_length_filter_or_trained_empty(tmp_path):
    rows = [alpaca(i) for i in range(30)]
    rows[4] = {"instruction": "Say nothing.", "input": ""}
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    quality = {"min_response_chars": 0}
    with pytest.raises(DataFormatError, match=r"a.jsonl:5: missing field `output` \(absent or null\)"):
        prepare(run_cfg(tmp_path, path, quality=quality), tmp_path / "run", log=lambda s: None)
    data = prepare(run_cfg(tmp_path, path, quality=quality, skip_invalid=True), tmp_path / "run", log=lambda s: None)
    assert data.report["invalid"]["skipped"] == 1 and data.report["quality"] == {}
    assert data.report["train"]["rows"] == 29
    assert all("Say nothing" not in m[0]["content"] for m in data.train["messages"])


# ---------------------------------------------------------------------------- too many invalid rows
def test_skip_invalid_stops_when_a_source_is_mostly_invalid(tmp_path):
    rows = [alpaca(i) for i in range(8)] + [{"instruction": "a", "output": 1}, {"instruction": "b"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        prepare(run_cfg(tmp_path, path, skip_invalid=True), tmp_path / "run", log=lambda s: None)
    assert str(e.value) == (
        f"{path}: 2 of 10 rows are invalid (20%), more than data.max_invalid_fraction=0.1 of a source, so the run "
        f"stops rather than train on what is left. First reasons: {path}:9: field `output` must be a string, got a "
        f"number (1); {path}:10: missing field `output` (absent or null): every alpaca row needs it as a string. "
        "Fix those rows; if most rows are reported as another format or missing a field, set the source's "
        "`format:` or map its fields with `columns:`; to train on the valid rows anyway, raise "
        "data.max_invalid_fraction"
    )
    data = prepare(
        run_cfg(tmp_path, path, skip_invalid=True, max_invalid_fraction=0.2), tmp_path / "run", log=lambda s: None
    )
    assert data.report["invalid"]["skipped"] == 2 and data.report["train"]["rows"] == 8


def test_max_invalid_fraction_is_a_documented_key():
    from tuneforge.config.schema import DataConfig

    field = DataConfig.model_fields["max_invalid_fraction"]
    assert field.default == 0.1 and "skip_invalid" in field.description


# ---------------------------------------------------------------------------- consistent row numbers
def test_the_same_row_has_the_same_line_in_every_message(tmp_path):
    good = [alpaca(i) for i in range(20)]
    text = (
        "".join(json.dumps(r) + "\n" for r in good[:3])
        + "\n"
        + json.dumps({"instruction": 3, "output": "x"})
        + "\n"
        + "".join(json.dumps(r) + "\n" for r in good[3:])
    )  # a blank line 4; the bad row on line 5
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=r"^" + str(path) + ":5: field `instruction` must be a string"):
        prepare(run_cfg(tmp_path, path), tmp_path / "run", log=lambda s: None)
    data = prepare(run_cfg(tmp_path, path, skip_invalid=True), tmp_path / "run", log=lambda s: None)
    assert data.report["invalid"]["examples"][0].startswith(f"{path}:5: field `instruction`")
    # a JSON array file: the line each element starts on
    array = tmp_path / "a.json"
    array.write_text(json.dumps([good[0], good[1], {"instruction": "x", "output": None}], indent=1))
    with pytest.raises(DataFormatError, match=r"a.json:12: missing field `output`"):  # the line of its `{`
        load(array)
    # parquet has no lines: the 1-based row
    import datasets

    datasets.Dataset.from_list([good[0], {"instruction": "x", "output": None}]).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(DataFormatError, match=r"a.parquet row 2: missing field `output`"):
        load(tmp_path / "a.parquet")


def test_quality_examples_say_where_the_row_is(tmp_path):
    rows = [alpaca(i) for i in range(12)]
    rows[6]["output"] = "   "
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare(run_cfg(tmp_path, path), tmp_path / "run", log=lambda s: None)
    assert data.report["quality"]["min_response_chars"]["examples"] == [{"where": f"{path}:7", "response": "   "}]


# ---------------------------------------------------------------------------- CSV
def test_csv_errors_name_the_file_and_values_stay_text(tmp_path):
    wrong = tmp_path / "qa.csv"
    wrong.write_text("question,answer\nq1,a1\n")
    with pytest.raises(DataFormatError) as e:
        load(wrong)
    assert str(e.value) == (
        f"{wrong}: cannot tell the data format from its columns ['answer', 'question']; set "
        "`format:` (alpaca, messages, sharegpt, completion, preference, kto) and map your columns with `columns:`, "
        "e.g. columns: {instruction: question, output: answer}"
    )
    extra = tmp_path / "extra.csv"
    extra.write_text("instruction,input,output\na,b,c\nd,e,f,g\n")
    with pytest.raises(DataFormatError) as e:
        load(extra)
    assert str(e.value) == (
        f"{extra}:3: 4 fields where the header (line 1) has 3 (instruction, input, output); "
        'quote fields that contain commas, e.g. "a, b"'
    )
    numbers = tmp_path / "n.csv"
    numbers.write_text("instruction,input,output\nTwo plus one?,,3\nSay NA.,NA,NA\n")
    ds, _ = load(numbers)
    assert [m[-1]["content"] for m in ds["messages"]] == ["3", "NA"]  # text, not 3 (int) or null
    assert ds["messages"][1][0]["content"] == "Say NA.\n\nNA"


# ---------------------------------------------------------------------------- chat template refusals
ALTERNATE = (  # as Mistral's and Llama-2's templates do
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def chat(i: int, *roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"turn {k} of row {i} says {r}"} for k, r in enumerate(roles)]}


def test_a_row_the_chat_template_refuses_is_a_data_error_or_skipped(tmp_path):
    template = tmp_path / "mistral.jinja"
    template.write_text(ALTERNATE)
    rows = [chat(i, "user", "assistant") for i in range(20)]
    rows.insert(7, chat(99, "user", "user", "assistant"))  # line 8
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    refusal = "the chat template refused this row: Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(DataFormatError) as e:
        prepare(run_cfg(tmp_path, path, chat_template=str(template)), tmp_path / "run", log=lambda s: None)
    assert str(e.value) == f"{path}:8: {refusal}{HINT}, or choose another data.chat_template"
    data = prepare(
        run_cfg(tmp_path, path, chat_template=str(template), skip_invalid=True), tmp_path / "run", log=lambda s: None
    )
    inv = data.report["invalid"]
    assert inv["skipped"] == 1 and inv["examples"] == [f"{path}:8: {refusal}"]
    assert inv["reasons"] == {
        "refused by the chat template: Conversation roles must alternate user/assistant/user/assistant/...": 1
    }
    assert data.report["train"]["rows"] == 20 and data.report["train"]["dropped_short_or_untrained_rows"] == 0
    assert data.report["sources"][0]["rows_invalid"] == 1


def test_a_real_template_refusal_and_too_many_refusals_stop_the_run(tmp_path):
    from tests.conftest import shared_path

    template = shared_path("chat_templates/chujiezheng-mistral-instruct.jinja")
    rows = [chat(i, "user", "assistant") for i in range(7)]
    rows += [chat(i, "assistant", "user", "assistant") for i in range(3)]  # lines 8-10: start with the assistant
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = run_cfg(tmp_path, path, chat_template=str(template), skip_invalid=True)
    cfg.model = cfg.model.model_copy(update={"init": None, "name_or_path": str(shared_path("tokenizers/llama2"))})
    with pytest.raises(DataFormatError) as e:
        prepare(cfg, tmp_path / "run", log=lambda s: None)
    assert str(e.value).startswith(
        f"{path}: 3 of 10 rows are invalid (30%), more than data.max_invalid_fraction=0.1 of a source, so the run "
        f"stops rather than train on what is left. First reasons: {path}:8: the chat template refused this row: "
        "Conversation roles must alternate user/assistant/user/assistant/...; "
    )


def test_undefined_values_and_syntax_errors_of_a_template(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ m.meta.tag }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"
    )
    rows = [chat(i, "user", "assistant") for i in range(12)]
    rows[2]["messages"][0]["content"] = "boom"
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        prepare(run_cfg(tmp_path, path, chat_template=str(template)), tmp_path / "run", log=lambda s: None)
    assert str(e.value).startswith(
        f"{path}:3: the chat template refused this row: UndefinedError: 'dict object' "
        "has no attribute 'meta'; fix the row"
    )
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    from tuneforge.data.templates import TemplateError

    with pytest.raises(TemplateError) as e:
        prepare(run_cfg(tmp_path, path, chat_template=str(broken)), tmp_path / "run", log=lambda s: None)
    assert str(e.value).startswith(f"{broken} (data.chat_template), line 2: the chat template has a syntax error: ")
    assert str(e.value).endswith("; fix it, or set data.chat_template: chatml (or alpaca)")


def test_the_command_prints_one_line_without_a_traceback(tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    template = tmp_path / "mistral.jinja"
    template.write_text(ALTERNATE)
    path = write_jsonl(tmp_path / "c.jsonl", [chat(0, "user", "assistant"), chat(1, "assistant", "user", "assistant")])
    cfg = run_cfg(tmp_path, path, chat_template=str(template)).model_dump(mode="json", exclude_unset=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(tmp_path / "c.yaml")]) != 0
    err = capsys.readouterr().err
    assert f"{path}:2: the chat template refused this row: Conversation roles must alternate" in err
    assert "Traceback" not in err and "jinja2" not in err


def test_detection_votes_only_for_formats_whose_fields_the_source_has(tmp_path):
    # an `instruction` field beside raw text is not an Alpaca row (there is no `output` column)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"raw text {i}", "instruction": "meta"} for i in range(3)])
    ds, invalid = load(path)
    assert invalid["format"] == "completion" and ds["text"] == ["raw text 0", "raw text 1", "raw text 2"]
    # most rows decide, not the first one
    stray = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    rows = [stray] + [alpaca(i) for i in range(5)]
    ds, invalid = load(write_jsonl(tmp_path / "m.jsonl", rows), skip_invalid=True)
    assert invalid["format"] == "alpaca" and len(ds) == 5 and invalid["skipped"] == 1
    assert invalid["examples"][0].endswith(
        "m.jsonl:1: the row is a sharegpt row (it has `conversations`), but this "
        "source's rows are alpaca (auto-detected from 5 of its first 6 rows) (a "
        "source holds rows of one format: move it to a source of its own)"
    )
    # a format set in the config: the row of another format is reported as such
    with pytest.raises(
        DataFormatError,
        match=r"m.jsonl:1: the row is a sharegpt row \(it has `conversations`\), but "
        r"this source's rows are alpaca \(format: alpaca\)",
    ):
        load(tmp_path / "m.jsonl", format="alpaca")
