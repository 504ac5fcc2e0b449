"""Read data files and bring every row to one shape: `messages` (a chat) or `text` (raw completion).

Supported layouts (after `columns` renaming):
- alpaca:     {instruction, input?, output, system?}
- messages:   {messages: [{role, content}, ...]}              (OpenAI style)
- sharegpt:   {conversations: [{from, value}, ...], system?}
- completion: {text}

Every normalised row has both columns: `messages` (empty for completion rows) and `text`
(empty for chat rows), so sources of different layouts can be concatenated.
"""

from __future__ import annotations

import codecs
import json
import uuid
from pathlib import Path
from typing import Any

import datasets

from tuneforge.config.schema import DatasetSource

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "model": "assistant", "system": "system", "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}
CHAT_ROLES = {"system", "user", "assistant", "tool"}
CANONICAL_FEATURES = datasets.Features(
    {
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "text": datasets.Value("string"),
        "score": datasets.Value("float64"),
        "_invalid": datasets.Value("string"),
    }
)


class DataFormatError(ValueError):
    """A data file or row that tuneforge cannot use; the message names the file, row and fix."""


def column(ds: datasets.Dataset, name: str) -> list:
    """A column as a plain Python list, in one Arrow read (iterating ds[name] reads row by row)."""
    return ds.select_columns([name])[:][name]


def _scan_json_lines(path: Path) -> tuple[list[dict], list[str]]:
    """Parse a JSONL file line by line: (rows, problems) where each problem names its line."""
    rows, problems = [], []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8")
                continue
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                continue
            rows.append(row)
    return rows, problems


def _utf8_problem(path: Path) -> str | None:
    """The first place a text file is not valid UTF-8, as 'file:line: ...', or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk[: max(e.start, 0)].count(b"\n") + 1
                return f"{path}:{line}: not UTF-8 text ({e.reason} at byte {offset + max(e.start, 0)}); re-save the file as UTF-8"
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return None


def _diagnose(path: Path, error: Exception) -> str:
    """Say where a file that datasets could not parse goes wrong."""
    if path.suffix == ".jsonl" or path.suffix == ".json":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            return f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8"
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
        else:
            _, problems = _scan_json_lines(path)
            if problems:
                return problems[0] + " (or set data.skip_invalid: true to skip bad lines)"
    return f"{path}: could not be read: {type(error).__name__}: {error}"


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _read_files(files: list[Path], builder: str, skip_invalid: bool) -> tuple[datasets.Dataset, list[str]]:
    """Load data files with `datasets`; name the file and line of the first problem, or (JSONL with
    skip_invalid) read line by line and return the problems skipped."""
    empty = [f for f in files if not _head(f).strip()]
    if empty:
        raise DataFormatError(f"{empty[0]}: the file is empty; remove it from data.train or fill it")
    lenient = skip_invalid and all(f.suffix == ".jsonl" for f in files)
    problem = next((m for m in (_utf8_problem(f) for f in files if f.suffix != ".parquet") if m), None)
    if problem and not lenient:
        raise DataFormatError(problem)
    if not problem:
        try:
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train"), []
        except Exception as e:  # datasets wraps parser errors in many types
            if not lenient:
                found = [d for d in (_diagnose(f, e) for f in files) if "could not be read" not in d]
                raise DataFormatError(found[0] if found else _diagnose(files[0], e)) from None
    rows, skipped = [], []
    for f in files:
        r, problems = _scan_json_lines(f)
        rows.extend(r)
        skipped.extend(problems)
    if not rows:
        raise DataFormatError(f"{files[0]}: no readable rows ({len(skipped)} skipped: {skipped[:1]})")
    return datasets.Dataset.from_list(rows), skipped


def read_source(src: DatasetSource, skip_invalid: bool = False) -> tuple[datasets.Dataset, str, list[str]]:
    """Load one source as a `datasets.Dataset` (no normalisation yet). Returns (dataset, name, skipped lines)."""
    if src.synthetic is not None:
        from tuneforge.data.synthetic import SyntheticTextError, generate

        try:
            rows = generate(src.synthetic.task, src.synthetic.rows, src.synthetic.seed, src.synthetic.text)
        except (SyntheticTextError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(f"synthetic task {src.synthetic.task}: {e}") from None
        return datasets.Dataset.from_list(rows), f"synthetic:{src.synthetic.task}", []
    path = Path(src.path).expanduser()
    skipped: list[str] = []
    if not path.exists():
        raise DataFormatError(f"{path}: data file not found (data source `path`); check the path or run from the config's folder")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataFormatError(f"{path}: no split {src.split!r}; it has {sorted(ds)} (set `split:`)")
            ds = ds[src.split]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise DataFormatError(f"{path}: no .json/.jsonl/.csv/.parquet files in this directory")
        kinds = {FILE_BUILDERS.get(p.suffix) for p in files}
        if None in kinds or len(kinds) != 1:
            raise DataFormatError(
                f"{path}: unsupported or mixed file types {sorted(p.suffix for p in files)}; "
                "use .json, .jsonl, .csv or .parquet (one kind per source)"
            )
        ds, skipped = _read_files(files, kinds.pop(), skip_invalid)
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))
    return ds, str(path), skipped


def detect_format(columns: list[str]) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "completion"
    raise DataFormatError(
        f"cannot tell the data format from columns {sorted(cols)}; set `format:` "
        "(alpaca, messages, sharegpt, completion) and map your columns with `columns:`"
    )


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _alpaca(row: dict) -> list[dict]:
    user = _str(row.get("instruction")).strip()
    extra = _str(row.get("input")).strip()
    if extra:
        user = f"{user}\n\n{extra}" if user else extra
    msgs = [{"role": "system", "content": _str(row["system"])}] if _str(row.get("system")) else []
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": _str(row.get("output"))}]


def _messages(row: dict) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("`messages` must be a non-empty list of {role, content}")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs `role` and `content`; got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"unknown role {m['role']!r}; expected one of {sorted(CHAT_ROLES)}")
        out.append({"role": _str(m["role"]), "content": _str(m["content"])})
    return out


def _sharegpt(row: dict) -> list[dict]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("`conversations` must be a non-empty list of {from, value}")
    out = [{"role": "system", "content": _str(row["system"])}] if _str(row.get("system")) else []
    for m in conv:
        who = _str(m.get("from")).lower() if isinstance(m, dict) else ""
        if who not in SHAREGPT_ROLES:
            raise ValueError(f"unknown speaker {who!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[who], "content": _str(m.get("value"))})
    return out


def _to_canonical(row: dict, fmt: str) -> dict:
    if fmt == "completion":
        text = row.get("text")
        if not isinstance(text, str):
            raise ValueError("`text` must be a string")
        return {"messages": [], "text": text}
    msgs = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}[fmt](row)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("the row has no assistant turn, so nothing would be trained")
    return {"messages": msgs, "text": ""}


def normalize(ds: datasets.Dataset, src: DatasetSource, name: str, num_proc: int = 1, score_column: str | None = None,
              skip_invalid: bool = False) -> tuple[datasets.Dataset, dict]:
    """Rename columns, detect the layout and convert every row to the canonical columns.

    Returns (rows, invalid) where invalid = {"skipped": n, "reasons": {reason: count}, "examples": [...]}.
    A malformed row raises DataFormatError naming the source and row, unless `skip_invalid`.
    """
    rename = {theirs: ours for ours, theirs in src.columns.items() if theirs != ours}
    missing = [theirs for theirs in rename if theirs not in ds.column_names]
    if missing:
        raise DataFormatError(
            f"{name}: `columns` maps from {missing}, which the data does not have; it has {ds.column_names}"
        )
    ds = ds.rename_columns(rename) if rename else ds
    if len(ds) == 0:
        raise DataFormatError(f"{name}: the data source has no rows")
    fmt = src.format if src.format != "auto" else detect_format(ds.column_names)
    required = {"alpaca": ["instruction", "output"], "messages": ["messages"], "sharegpt": ["conversations"], "completion": ["text"]}[fmt]
    absent = [c for c in required if c not in ds.column_names]
    if absent:
        raise DataFormatError(
            f"{name}: format {fmt!r} needs column(s) {absent}; the data has {ds.column_names}. "
            f"Map yours with `columns: {{{absent[0]}: your_column}}`"
        )

    def convert(batch: dict, idx: list[int]) -> dict:
        out: dict[str, list] = {"messages": [], "text": [], "score": [], "_invalid": []}
        keys = list(batch)
        for j, i in enumerate(idx):
            row = {k: batch[k][j] for k in keys}
            try:
                c = _to_canonical(row, fmt)
                reason = ""
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                if not skip_invalid:
                    raise DataFormatError(f"{name} row {i} ({fmt} format): {e} (or set data.skip_invalid: true to skip such rows)") from None
                c, reason = {"messages": [], "text": ""}, str(e).split(";")[0]
            out["messages"].append(c["messages"])
            out["text"].append(c["text"])
            out["_invalid"].append(reason)
            value = row.get(score_column) if score_column else None
            try:
                out["score"].append(float(value) if value is not None else None)
            except (TypeError, ValueError):
                out["score"].append(None)
        return out

    conv = ds.map(
        convert, batched=True, with_indices=True, remove_columns=ds.column_names,
        features=CANONICAL_FEATURES, num_proc=num_proc if len(ds) > 1000 and num_proc > 1 else None, desc=f"format {fmt}",
        new_fingerprint=uuid.uuid4().hex,  # tuneforge caches the stage itself; skip hashing the closure
    )
    invalid = {"skipped": 0, "reasons": {}, "examples": []}
    reasons = column(conv, "_invalid")
    bad = [i for i, r in enumerate(reasons) if r]
    for i in bad:
        reason = reasons[i]
        invalid["reasons"][reason] = invalid["reasons"].get(reason, 0) + 1
        if len(invalid["examples"]) < 3:
            invalid["examples"].append(f"{name} row {i}: {reason}")
    invalid["skipped"] = len(bad)
    if bad:
        conv = conv.select([i for i, r in enumerate(reasons) if not r])
    return conv.remove_columns("_invalid"), invalid
