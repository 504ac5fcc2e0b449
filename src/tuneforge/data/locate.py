"""Where a row of a data source is, for error messages: `file:line` (1-based lines, as editors count them).

Rows are found lazily, only when a message needs them: the first time a file is asked about, its rows' first
lines are read once (JSON Lines: the non-blank lines; a JSON array: where each element starts; CSV: where each
record starts, after the header). Parquet files and saved datasets have no lines: `file row N` (1-based).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

JSON_GZ = (".jsonl.gz", ".json.gz")  # gzip-compressed JSON is read as its inner suffix says


def data_suffix(path: Path) -> str:
    """A data file's suffix, '.jsonl' for 'x.jsonl.gz' and '.json' for 'x.json.gz'."""
    name = path.name.lower()
    return next((s[:-3] for s in JSON_GZ if name.endswith(s)), path.suffix)


def open_bytes(path: Path):
    """The file's bytes, decompressed when it is a .jsonl.gz / .json.gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(JSON_GZ) else open(path, "rb")


def read_text(path: Path, errors: str = "strict") -> str:
    with open_bytes(path) as fh:
        return fh.read().decode("utf-8", errors)


def _json_array_lines(text: str) -> list[int] | None:
    """The line each element of a top-level JSON array starts on, or None when the text is not one."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        return None
    decoder, lines, pos, line, counted = json.JSONDecoder(), [], start + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return lines


def row_lines(path: Path) -> list[int] | None:
    """The 1-based line each row of a data file starts on, as `datasets` reads the rows; None: no lines (parquet)."""
    suffix = data_suffix(path)
    if suffix == ".parquet":
        return None
    if suffix == ".csv":
        out, last = [], 0
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            for k, record in enumerate(reader):
                if k and record:  # not the header, not a blank line
                    out.append(last + 1)
                last = reader.line_num
        return out
    if suffix == ".txt":
        with open(path, "rb") as fh:
            return list(range(1, sum(1 for _ in fh) + 1))
    if suffix == ".json":
        text = read_text(path, errors="replace")
        lines = _json_array_lines(text)
        if lines is not None:
            return lines
    with open_bytes(path) as fh:
        return [n for n, raw in enumerate(fh, 1) if raw.strip()]


def _rows_in(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


class RowLocator:
    """`locator(i)` -> where row i (0-based, in the order read) of a source is: 'file:line' or 'name row N'.

    `files`: the source's data files in the order they were read; `lines`: (file, line) of every row when the
    reader already knows them (JSON Lines read line by line); neither: `name row N`."""

    def __init__(self, name: str, files: list[Path] | None = None, lines: list[tuple[str, int]] | None = None):
        self.name, self.files, self.lines = name, list(files or []), lines
        self._spans: list[tuple[Path, int, list[int] | None, int]] = []  # (file, first row, lines, rows)

    def __call__(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.lines[i][0]}:{self.lines[i][1]}" if 0 <= i < len(self.lines) else f"{self.name} row {i + 1}"
        first = 0
        for k, f in enumerate(self.files):
            if k == len(self._spans):
                try:
                    lines = row_lines(f)
                    self._spans.append((f, first, lines, len(lines) if lines is not None else _rows_in(f)))
                except (OSError, ValueError, ImportError):
                    break
            path, first, lines, n = self._spans[k]
            if i < first + n:
                return f"{path}:{lines[i - first]}" if lines is not None else f"{path} row {i - first + 1}"
            first += n
        return f"{self.name} row {i + 1}"
