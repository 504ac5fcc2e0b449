"""JSON and JSON Lines files parsed row by row, each problem named by its file and line (1-based): the reader
of last resort, for files `datasets` cannot load (mixed value types) and for skipping bad lines
(data.skip_invalid). Gzip-compressed files (.jsonl.gz, .json.gz) are read as they are."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from tuneforge.data.locate import _json_array_lines, data_suffix, open_bytes, read_text


def scan_json_lines(path: Path) -> tuple[list[dict], list[str], list[int]]:
    """Parse a JSONL file line by line: (rows, problems where each names its line, the rows' lines)."""
    rows, problems, lines = [], [], []
    with open_bytes(path) as fh:
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
            lines.append(n)
    return rows, problems, lines


def utf8_problem(path: Path) -> str | None:
    """The first place a text file is not valid UTF-8, as 'file:line: ...', or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open_bytes(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk[: max(e.start, 0)].count(b"\n") + 1
                return (
                    f"{path}:{line}: not UTF-8 text ({e.reason} at byte {offset + max(e.start, 0)}); "
                    "re-save the file as UTF-8"
                )
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return None


def scan_json(path: Path) -> tuple[list[dict], list[str], list[int]]:
    """`scan_json_lines`, or the elements of a file holding one JSON array."""
    text = read_text(path) if data_suffix(path) == ".json" else ""
    if not text.lstrip().startswith("["):
        return scan_json_lines(path)
    rows, problems, lines = [], [], []
    for row, line in zip(json.loads(text), _json_array_lines(text)):
        if isinstance(row, dict):
            rows.append(row)
            lines.append(line)
        else:
            problems.append(f"{path}:{line}: expected a JSON object per array element, got {type(row).__name__}")
    return rows, problems, lines
