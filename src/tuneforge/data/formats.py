"""Read data files and bring every row to one shape: `messages` (a chat) or `text` (raw completion); preference
and KTO rows also hold their completions (`chosen`, `rejected` / `completion`, `label`).

Supported layouts (after `columns` renaming):
- alpaca:     {instruction, input?, output, system?}
- messages:   {messages: [{role, content, tool_calls?}, ...], tools?}  (OpenAI style)
- sharegpt:   {conversations: [{from, value}, ...], system?, tools?}  (`function_call` / `observation` turns)
- completion: {text}
- preference: {prompt, chosen, rejected} / {conversations, chosen, rejected} / {chosen, rejected} transcripts
- kto:        {messages, label}                                 (see preference.py)

Every normalised row has both columns: `messages` (empty for completion rows) and `text`
(empty for chat rows), so sources of different layouts can be concatenated, and `source_row`, its position
in the source as read (0-based; messages say `file:line`, see locate.py). The fields are type-checked
(fields.py): a malformed row is an error naming its file and line, or, with `data.skip_invalid`, skipped and
counted.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import datasets

from tuneforge.config.schema import DatasetSource
from tuneforge.data import invalid as invalid_rows
from tuneforge.data import preference
from tuneforge.data.fields import (
    CHAT_ROLES,
    DETECT_ROWS,
    MARKERS,
    SHAREGPT_ROLES,
    RowError,
    candidate_formats,
    to_canonical,
    vote,
)
from tuneforge.data.json_rows import scan_json, scan_json_lines, utf8_problem
from tuneforge.data.locate import RowLocator, data_suffix, open_bytes, read_text
from tuneforge.errors import TuneforgeError

__all__ = [
    "CHAT_ROLES",
    "SHAREGPT_ROLES",
    "DataFormatError",
    "column",
    "detect_format",
    "normalize",
    "read_source",
    "read_source_located",
]

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
CANONICAL_FEATURES = datasets.Features(
    {
        "messages": [
            {
                "role": datasets.Value("string"),
                "content": datasets.Value("string"),
                "tool_calls": datasets.Value("string"),  # JSON text, null when none (see tool_calls.py)
                "tool_call_id": datasets.Value("string"),
            }
        ],
        "text": datasets.Value("string"),
        "score": datasets.Value("float64"),
        "source_row": datasets.Value("int64"),
        "_invalid": datasets.Value("string"),
    }
)


FORMAT_NAMES = "alpaca, messages, sharegpt, completion, preference, kto"


def canonical_features(fmt: str) -> datasets.Features:
    """The normalised columns of a format's rows (preference and KTO rows add their completions)."""
    extra = preference.FEATURES.get(preference.format_kind(fmt), {})
    return datasets.Features({**CANONICAL_FEATURES, **extra}) if extra else CANONICAL_FEATURES


class DataFormatError(TuneforgeError, ValueError):
    """A data file or row that tuneforge cannot use; the message names the file, line and fix."""


def column(ds: datasets.Dataset, name: str) -> list:
    """A column as a plain Python list, in one Arrow read (iterating ds[name] reads row by row)."""
    return ds.select_columns([name])[:][name]


def _diagnose(path: Path, error: Exception) -> str:
    """Say where a file that datasets could not parse goes wrong."""
    if data_suffix(path) in (".jsonl", ".json"):
        try:
            text = read_text(path)
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            return f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8"
        if data_suffix(path) == ".json" and text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
        else:
            _, problems, _ = scan_json_lines(path)
            if problems:
                return problems[0] + " (or set data.skip_invalid: true to skip bad lines)"
    if path.suffix == ".csv":
        problem = _csv_problem(path)
        if problem:
            return problem
    cause = error.__cause__ or error.__context__ or error
    return f"{path}: could not be read: {type(cause).__name__}: {cause}"


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return next(csv.reader(fh), [])


def _csv_problem(path: Path) -> str | None:
    """The first CSV record whose number of fields differs from the header's, as 'file:line: ...'."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header, last = next(reader, []), reader.line_num
        for record in reader:
            if record and len(record) != len(header):
                return (
                    f"{path}:{last + 1}: {len(record)} fields where the header (line 1) has {len(header)} "
                    f'({", ".join(header)}); quote fields that contain commas, e.g. "a, b"'
                )
            last = reader.line_num
    return None


def csv_features(files: list[Path]) -> datasets.Features:
    """Every CSV column as text: the data is text, not numbers to infer (an answer "3" stays "3")."""
    header = _csv_header(files[0])
    for f in files[1:]:
        if _csv_header(f) != header:
            raise DataFormatError(
                f"{f}: its columns {_csv_header(f)} differ from those of {files[0]} {header}; "
                "the CSV files of one source need the same header line"
            )
    if len(set(header)) != len(header) or not all(header):
        raise DataFormatError(f"{files[0]}:1: the header line needs distinct, non-empty column names; it has {header}")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _head(path: Path, n: int = 4096) -> bytes:
    with open_bytes(path) as fh:
        return fh.read(n)


def _read_files(files: list[Path], builder: str, skip_invalid: bool) -> tuple[datasets.Dataset, list[str], list | None]:
    """Load data files with `datasets`; name the file and line of the first problem, or (JSONL with
    skip_invalid) read line by line and return the problems skipped. Returns (rows, problems skipped, the
    (file, line) of every row when read line by line, else None)."""
    empty = [f for f in files if not _head(f).strip()]
    if empty:
        raise DataFormatError(f"{empty[0]}: the file is empty; remove it from data.train or fill it")
    lenient = skip_invalid and all(data_suffix(f) == ".jsonl" for f in files)
    problem = next((m for m in (utf8_problem(f) for f in files if f.suffix != ".parquet") if m), None)
    if problem and not lenient:
        raise DataFormatError(problem)
    if not problem:
        options = {"features": csv_features(files), "na_filter": False} if builder == "csv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
            return ds, [], None
        except Exception as e:  # datasets wraps parser errors in many types
            found = [d for d in (_diagnose(f, e) for f in files) if "could not be read" not in d]
            if not lenient and (found or builder != "json"):
                raise DataFormatError(found[0] if found else _diagnose(files[0], e)) from None
            # JSON that parses, which datasets could not read (values of mixed types): read it here
    rows, skipped, where = [], [], []
    for f in files:
        r, problems, lines = scan_json(f)
        rows.extend(r)
        skipped.extend(problems)
        where.extend((str(f), n) for n in lines)
    if not rows:
        raise DataFormatError(f"{files[0]}: no readable rows ({len(skipped)} skipped: {skipped[:1]})")
    return _from_rows(rows), skipped, where


def _from_rows(rows: list[dict]) -> datasets.Dataset:
    """Rows of any keys and value types as a Dataset: every field keeps its JSON value (type-checked later)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_dict(
        {k: [r.get(k) for r in rows] for k in keys}, features=datasets.Features({k: datasets.Json() for k in keys})
    )


def read_source(src: DatasetSource, skip_invalid: bool = False) -> tuple[datasets.Dataset, str, list[str]]:
    """Load one source as a `datasets.Dataset` (no normalisation yet). Returns (dataset, name, skipped lines)."""
    ds, name, skipped, _ = read_source_located(src, skip_invalid)
    return ds, name, skipped


def read_source_located(
    src: DatasetSource,
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, str, list[str], RowLocator]:
    """`read_source`, and where each row is (`RowLocator`: row index -> 'file:line')."""
    if src.synthetic is not None:
        from tuneforge.data.synthetic import SyntheticTextError, generate

        try:
            rows = generate(src.synthetic.task, src.synthetic.rows, src.synthetic.seed, src.synthetic.text)
        except (SyntheticTextError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(f"synthetic task {src.synthetic.task}: {e}") from None
        name = f"synthetic:{src.synthetic.task}"
        return datasets.Dataset.from_list(rows), name, [], RowLocator(name)
    path = Path(src.path).expanduser()
    skipped: list[str] = []
    if not path.exists():
        raise DataFormatError(
            f"{path}: data file not found (data source `path`); check the path or run from the config's folder"
        )
    locator = RowLocator(str(path))
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataFormatError(f"{path}: no split {src.split!r}; it has {sorted(ds)} (set `split:`)")
            ds = ds[src.split]
    else:
        files = sorted(p for p in path.rglob("*") if data_suffix(p) in FILE_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise DataFormatError(f"{path}: no .json/.jsonl/.csv/.parquet files in this directory")
        kinds = {FILE_BUILDERS.get(data_suffix(p)) for p in files}
        if None in kinds or len(kinds) != 1:
            raise DataFormatError(
                f"{path}: unsupported or mixed file types {sorted(p.suffix for p in files)}; "
                "use .json, .jsonl (or .jsonl.gz), .csv or .parquet (one kind per source)"
            )
        ds, skipped, where = _read_files(files, kinds.pop(), skip_invalid)
        locator = RowLocator(str(path), files, where)
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))
    return ds, str(path), skipped, locator


def _locator_of(name: str) -> RowLocator:
    """Where the rows of the source called `name` are, when it was read without asking (`read_source`)."""
    path = Path(name)
    if path.is_file() and data_suffix(path) in FILE_BUILDERS:
        return RowLocator(name, [path])
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return RowLocator(name, sorted(p for p in path.rglob("*") if data_suffix(p) in FILE_BUILDERS))
    return RowLocator(name)


def detect_format(columns: list[str], name: str = "data") -> str:
    """The format a source's columns suggest (the first of FORMATS whose fields are there)."""
    candidates = candidate_formats(columns)
    if candidates:
        return candidates[0]
    raise DataFormatError(
        f"{name}: cannot tell the data format from its columns {sorted(columns)}; set `format:` "
        f"({FORMAT_NAMES}) and map your columns with `columns:`, e.g. "
        "columns: {instruction: question, output: answer}"
    )


def detect_rows(ds: datasets.Dataset, name: str) -> tuple[str, str]:
    """(format, how it was chosen) by a vote of the first DETECT_ROWS rows: each row votes for the format whose
    fields it has. Rows of another format are then invalid rows (reported with their line)."""
    candidates = candidate_formats(ds.column_names)
    if not candidates:
        detect_format(ds.column_names, name)  # raises, naming the columns
    fields = list(dict.fromkeys(k for fmt in candidates for k in MARKERS[fmt]))
    n = min(len(ds), DETECT_ROWS)
    head = ds.select_columns(fields).select(range(n))[:]
    fmt, votes = vote([{k: head[k][i] for k in fields} for i in range(n)], candidates)
    if fmt is None:
        raise DataFormatError(
            f"{name}: none of its first {n} rows has the fields of a known format (it has columns "
            f"{sorted(ds.column_names)}); set `format:` ({FORMAT_NAMES}) and "
            "map your columns with `columns:`"
        )
    return fmt, f" (auto-detected from {votes[fmt]} of its first {n} rows)"


def normalize(
    ds: datasets.Dataset,
    src: DatasetSource,
    name: str,
    num_proc: int = 1,
    score_column: str | None = None,
    skip_invalid: bool = False,
    locate: RowLocator | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Rename columns, detect the layout and convert every row to the canonical columns.

    Returns (rows, invalid) where invalid = {"skipped": n, "reasons": {reason: count}, "examples": [...],
    "format": the format}. A malformed row raises DataFormatError naming the file and line, unless `skip_invalid`.
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
    locate = locate or _locator_of(name)
    fmt, why = detect_rows(ds, name) if src.format == "auto" else (src.format, f" (format: {src.format})")
    required = {
        "alpaca": ["instruction", "output"],
        "messages": ["messages"],
        "sharegpt": ["conversations"],
        "completion": ["text"],
        "preference": ["chosen", "rejected"],
        "kto": ["messages", "label"],
    }[fmt]
    absent = [c for c in required if c not in ds.column_names]
    if absent:
        raise DataFormatError(
            f"{name}: format {fmt!r} needs column(s) {absent}; the data has {ds.column_names}. "
            f"Map yours with `columns: {{{absent[0]}: your_column}}`"
        )
    names = dict(src.columns)
    features = canonical_features(fmt)
    fields = [k for k in features if k not in ("score", "source_row", "_invalid")]
    canonical = preference.to_canonical if preference.format_kind(fmt) != "sft" else to_canonical
    blank = {"messages": [], "text": "", "chosen": "", "rejected": "", "completion": "", "label": False}

    def convert(batch: dict, idx: list[int]) -> dict:
        out: dict[str, list] = {**{k: [] for k in fields}, "score": [], "source_row": idx, "_invalid": []}
        keys = list(batch)
        for j in range(len(idx)):
            row = {k: batch[k][j] for k in keys}
            try:
                c, reason = canonical(row, fmt, names, why), ""
            except RowError as e:
                c, reason = blank, json.dumps([e.reason, str(e)])
            for k in fields:
                out[k].append(c[k])
            out["_invalid"].append(reason)
            value = row.get(score_column) if score_column else None
            try:
                out["score"].append(float(value) if value is not None else None)
            except (TypeError, ValueError):
                out["score"].append(None)
        return out

    conv = ds.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc if len(ds) > 1000 and num_proc > 1 else None,
        desc=f"format {fmt}",
        new_fingerprint=uuid.uuid4().hex,  # tuneforge caches the stage itself; skip hashing the closure
    )
    invalid = invalid_rows.empty()
    reasons = column(conv, "_invalid")
    bad = [i for i, r in enumerate(reasons) if r]
    for i in bad:
        reason, message = json.loads(reasons[i])
        shown = len(invalid["examples"]) < invalid_rows.EXAMPLES
        invalid_rows.add(invalid, reason, f"{locate(i)}: {message}" if shown else "")
    if bad and not skip_invalid:
        more = f" ({len(bad) - 1} more invalid rows in {name}, the next at {locate(bad[1])})" if len(bad) > 1 else ""
        raise DataFormatError(f"{invalid['examples'][0]}{more}; {invalid_rows.SKIP_HINT}")
    if bad:
        conv = conv.select([i for i, r in enumerate(reasons) if not r])
    invalid["format"] = fmt
    return conv.remove_columns("_invalid"), invalid
