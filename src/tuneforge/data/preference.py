"""Preference pairs and unpaired KTO rows: their layouts, their checks, and the kind of data a run prepares.

Layouts (after `columns` renaming), read as the `preference` format (any row with `chosen` and `rejected`):
- `{prompt, chosen, rejected, system?}`: each a string or a list of messages (OpenAI {role, content} or
  ShareGPT {from, value}); a string prompt is a user turn, a string completion an assistant reply.
- `{conversations, chosen, rejected, system?}` (ShareGPT): conversations {from, value}; chosen/rejected a
  {from: gpt, value} message, a string or a list.
- `{chosen, rejected}` full transcripts that share their prompt (Anthropic HH: "\\n\\nHuman: ...\\n\\nAssistant:
  ..." text, or lists of messages): split at the last assistant turn; the turns before it must be the same.
and as the `kto` format: `{messages, label}`, the last (assistant) message is the completion, `label`
true (desirable) or false (undesirable).

Normalised rows: preference {messages (the prompt, ending with a user turn), chosen, rejected (reply texts)},
kto {messages, completion, label (bool)}. A row that does not fit raises `RowError` (formats.py makes that an
error naming file:line, or a counted skip with data.skip_invalid).

All sources of a run are of one kind, `sft`, `preference` or `kto` (`run_kind`); data_report.json says which
(`"kind"`, read with `prepared_kind`).
"""

from __future__ import annotations

import re

import datasets

from tuneforge.data.fields import (
    CHAT_ROLES,
    SHAREGPT_ROLES,
    Fields,
    RowError,
    content_text,
    kind,
    row_format,
    shown,
)
from tuneforge.errors import TuneforgeError

KIND_OF_FORMAT = {"preference": "preference", "kto": "kto"}  # every other format is sft
COMPLETIONS = {"sft": (), "preference": ("chosen", "rejected"), "kto": ("completion",)}
FEATURES = {
    "preference": {"chosen": datasets.Value("string"), "rejected": datasets.Value("string")},
    "kto": {"completion": datasets.Value("string"), "label": datasets.Value("bool")},
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class DataKindError(TuneforgeError, ValueError):
    """Sources of different kinds (SFT, preference, KTO) in one run, or a setting the kind cannot use."""


def format_kind(fmt: str) -> str:
    return KIND_OF_FORMAT.get(fmt, "sft")


def prepared_kind(report: dict) -> str:
    """'sft', 'preference' or 'kto': what a prepared dataset (its data_report.json) holds."""
    return report.get("kind", "sft")


def run_kind(sources: list[dict], packing: bool = False) -> str:
    """The one kind of every source's format (report entries with `source` and `format`), or DataKindError."""
    by_kind: dict[str, list[str]] = {}
    for s in sources:
        by_kind.setdefault(format_kind(s["format"]), []).append(f"{s['source']} ({s['format']})")
    if len(by_kind) > 1:
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in by_kind.items())
        raise DataKindError(
            f"data: the sources of one run must all be SFT, all preference pairs or all KTO rows; these are mixed: "
            f"{listed}. Train each kind in its own run (e.g. SFT first, then a preference run from its result)"
        )
    found = next(iter(by_kind), "sft")
    if packing and found != "sft":
        raise DataKindError(
            f"data.packing: true cannot pack {found} data ({', '.join(by_kind[found])}): a pair is never split, "
            "and tuneforge does not pack pairs; set data.packing: false (preference batches are padding-free already)"
        )
    return found


# ---------------------------------------------------------------------------- rows
def _message(m, name: str, default_role: str) -> dict:
    if isinstance(m, str):
        return {"role": default_role, "content": m}
    if not isinstance(m, dict):
        raise RowError(f"`{name}` must be a message {{role, content}} or {{from, value}}, got {kind(m)}", shown(m))
    if "from" in m and "role" not in m:
        who = m.get("from")
        if not isinstance(who, str) or who.lower() not in SHAREGPT_ROLES:
            raise RowError(f"`{name}.from` must be one of {sorted(SHAREGPT_ROLES)}", shown(who))
        value = m.get("value")
        if not isinstance(value, str):
            raise RowError(f"`{name}.value` must be a string, got {kind(value)}", shown(value))
        return {"role": SHAREGPT_ROLES[who.lower()], "content": value}
    role = m.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise RowError(f"`{name}.role` must be one of {sorted(CHAT_ROLES)}", shown(role))
    return {"role": role, "content": content_text(m.get("content"), f"{name}.content")}


def _turns(value, name: str, default_role: str) -> list[dict]:
    """A field holding a string, one message, or a list of messages, as messages."""
    if value is None:
        raise RowError(f"missing field `{name}` (absent or null)")
    if isinstance(value, (list, tuple)):
        if not value:
            raise RowError(f"`{name}` is an empty list")
        return [_message(m, f"{name}[{j}]", default_role) for j, m in enumerate(value)]
    if isinstance(value, (str, dict)):
        return [_message(value, name, default_role)]
    raise RowError(f"`{name}` must be a string, a message or a list of messages, got {kind(value)}", shown(value))


def hh_transcript(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' as messages (contents stripped)."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(
            f'`{name}` is a string but not a transcript of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns; '
            "give the prompt in a `prompt` field",
            shown(text),
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def _reply(msgs: list[dict], name: str) -> str:
    """The text of a completion that must be one assistant message."""
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError(f"`{name}` must be one assistant reply, got roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _check_prompt(prompt: list[dict], where: str) -> None:
    if not any(m["role"] == "user" for m in prompt):
        raise RowError(f"the prompt ({where}) has no user turn")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(f"the prompt ({where}) must end with a user turn, it ends with a {prompt[-1]['role']} turn")


def _check_completion(text: str, name: str) -> None:
    if not text.strip():
        raise RowError(f"`{name}` is an empty completion, so nothing would be trained")


def _with_system(f: Fields, prompt: list[dict]) -> list[dict]:
    system = f.text("system", False, "preference")
    return [{"role": "system", "content": system}, *prompt] if system and prompt[0]["role"] != "system" else prompt


def _transcripts(f: Fields) -> tuple[list[dict], str, str]:
    """Full transcripts sharing their prompt: (prompt, chosen reply, rejected reply)."""
    out = []
    for field in ("chosen", "rejected"):
        value, name = f.row.get(field), f.name(field)
        msgs = hh_transcript(value, name) if isinstance(value, str) else _turns(value, name, "assistant")
        if msgs[-1]["role"] != "assistant":
            raise RowError(f"the `{name}` transcript does not end with an assistant turn")
        out.append(msgs)
    chosen, rejected = out
    if chosen[:-1] != rejected[:-1]:
        turn = next(
            (k for k, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected))
        )
        raise RowError(
            f"the prompts of `{f.name('chosen')}` and `{f.name('rejected')}` do not match (the transcripts differ "
            "before their last assistant turn; a pair needs one shared prompt)",
            f": they differ at turn {turn + 1}",
        )
    return _with_system(f, chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def preference_row(f: Fields) -> dict:
    for field in ("chosen", "rejected"):
        if f.row.get(field) is None:
            raise RowError(f"missing field `{f.name(field)}` (absent or null): every preference row needs it")
    if f.present("prompt") or f.present("conversations"):
        field = "prompt" if f.present("prompt") else "conversations"
        prompt = _with_system(f, _turns(f.row[field], f.name(field), "user"))
        where = f"`{f.name(field)}`"
        chosen = _reply(_turns(f.row["chosen"], f.name("chosen"), "assistant"), f.name("chosen"))
        rejected = _reply(_turns(f.row["rejected"], f.name("rejected"), "assistant"), f.name("rejected"))
    else:
        prompt, chosen, rejected = _transcripts(f)
        where = "the turns before the last assistant turn"
    if not prompt:
        raise RowError("the pair has no prompt")
    _check_prompt(prompt, where)
    _check_completion(chosen, f.name("chosen"))
    _check_completion(rejected, f.name("rejected"))
    if chosen == rejected:
        raise RowError(
            f"`{f.name('chosen')}` and `{f.name('rejected')}` are the same reply, so the pair prefers nothing"
        )
    return {"messages": prompt, "text": "", "chosen": chosen, "rejected": rejected}


def kto_row(f: Fields) -> dict:
    name = f.name("messages")
    msgs = f.row.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowError(f"`{name}` must be a non-empty list of {{role, content}}, got {kind(msgs)}", shown(msgs))
    msgs = [_message(m, f"{name}[{j}]", "user") for j, m in enumerate(msgs)]
    label = f.row.get("label")
    if not isinstance(label, bool):
        raise RowError(
            f"`{f.name('label')}` must be a boolean (true: desirable, false: undesirable), got {kind(label)}",
            shown(label),
        )
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"the last message of `{name}` must be the assistant completion, got {msgs[-1]['role']}")
    if len(msgs) < 2:
        raise RowError(f"`{name}` has no prompt before the completion")
    _check_prompt(msgs[:-1], f"`{name}` before the last message")
    _check_completion(msgs[-1]["content"], f"{name}[{len(msgs) - 1}].content")
    return {"messages": msgs[:-1], "text": "", "completion": msgs[-1]["content"], "label": label}


def to_canonical(row: dict, fmt: str, names: dict[str, str] | None = None, why_fmt: str = "") -> dict:
    """The normalised row of a `preference` or `kto` row, or RowError."""
    f = Fields(row, names)
    if fmt == "kto" and f.present("chosen") and f.present("rejected"):
        other = "preference"
    else:
        other = None if f.present("chosen" if fmt == "preference" else "label") else row_format(row)
    if other is not None and other != fmt:
        raise RowError(
            f"the row is a {other} row, but this source's rows are {fmt}{why_fmt} "
            "(a source holds rows of one format: move it to a source of its own)"
        )
    return preference_row(f) if fmt == "preference" else kto_row(f)


# ---------------------------------------------------------------------------- the filter stages
def filter_view(ds: datasets.Dataset, kind_: str, both: bool = False) -> datasets.Dataset:
    """Rows as the quality, dedup and decontamination stages read them (`messages`, `text`, `score`, where the
    row is, `_row`: its index in `ds`): the prompt with the chosen reply (KTO: the completion); `both` adds the
    rejected reply too (decontamination compares the prompt and both completions). SFT rows are left as they are."""
    if kind_ == "sft":
        return ds
    replies = COMPLETIONS[kind_][: 2 if both else 1]
    cols = ds.select_columns(["messages", *replies])[:]
    messages = [
        [*prompt, *({"role": "assistant", "content": cols[r][i]} for r in replies)]
        for i, prompt in enumerate(cols["messages"])
    ]
    keep = [c for c in ("score", "source_id", "source_row") if c in ds.column_names]
    features = datasets.Features(
        {
            "messages": ds.features["messages"],
            "text": datasets.Value("string"),
            **{c: ds.features[c] for c in keep},
            "_row": datasets.Value("int64"),
        }
    )
    data = {"messages": messages, "text": [""] * len(ds), **ds.select_columns(keep)[:], "_row": list(range(len(ds)))}
    return datasets.Dataset.from_dict(data, features=features)


def rows_kept(ds: datasets.Dataset, view: datasets.Dataset) -> datasets.Dataset:
    """The rows of `ds` whose views the stages kept (`ds` itself for SFT, whose view is itself)."""
    if "_row" not in view.column_names:
        return view
    kept = view.select_columns(["_row"])[:]["_row"]
    return ds if len(kept) == len(ds) else ds.select(kept)
