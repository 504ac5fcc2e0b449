"""One data source read and normalised, where its rows are (`file:line`), and its invalid rows counted across
the stages that find them: reading (unreadable lines), normalising (wrong field types, missing fields, rows
of another format) and tokenizing (rows the chat template refuses)."""

from __future__ import annotations

import datasets

from tuneforge.config.schema import DataConfig, DatasetSource
from tuneforge.data import invalid as invalid_rows
from tuneforge.data.formats import DataFormatError, normalize, read_source_located


def read_normalized(src: DatasetSource, d: DataConfig, locators: dict, source_id: int) -> tuple[datasets.Dataset, dict]:
    """One source read and normalised: (rows, its report entry with its own "invalid" counts); raises when more
    than data.max_invalid_fraction of its rows are invalid. `locators[source_id]` says where its rows are."""
    raw, name, bad_lines, locators[source_id] = read_source_located(src, d.skip_invalid)
    rows, bad_rows = normalize(raw, src, name, d.num_proc, d.quality.score_column, d.skip_invalid, locators[source_id])
    invalid = invalid_rows.empty()
    for line in bad_lines:
        invalid_rows.add(invalid, "unreadable line", line)
    invalid_rows.merge(invalid, bad_rows)
    read = len(raw) + len(bad_lines)
    too_many = invalid_rows.too_many(name, invalid["skipped"], read, invalid["examples"], d.max_invalid_fraction)
    if too_many:
        raise DataFormatError(too_many)
    return rows, {
        "source": name,
        "format": bad_rows["format"],
        "rows_read": read,
        "rows_valid": len(rows),
        "rows_invalid": invalid["skipped"],
        "invalid": invalid,
    }


def row_locator(ds: datasets.Dataset, locators: dict):
    """row index of `ds` (rows with source_id and source_row) -> 'file:line'."""

    def locate(i: int) -> str:
        row = ds.select_columns(["source_id", "source_row"])[i]
        return locators[row["source_id"]](row["source_row"])

    return locate if {"source_id", "source_row"} <= set(ds.column_names) else None


def template_invalid(report: dict, reps: list[dict | None], d: DataConfig) -> None:
    """Count the rows the chat template refused (tokenize stage) as invalid rows of their sources; stop when a
    source then has more than data.max_invalid_fraction invalid rows."""
    for rep in reps:
        refused = (rep or {}).get("template_errors")
        if not refused:
            continue
        invalid_rows.merge(report["invalid"], refused)
        report["invalid"]["template"] = report["invalid"].get("template", 0) + refused["skipped"]
        for sid, n in refused.pop("by_source").items():
            at = int(sid) if int(sid) >= 0 else len(d.train)  # the eval source's entry follows the training ones
            if at >= len(report["sources"]):
                continue
            source = report["sources"][at]
            source["rows_invalid"] = source.get("rows_invalid", 0) + n
            too_many = invalid_rows.too_many(
                source["source"],
                source["rows_invalid"],
                source["rows_read"],
                refused["examples"],
                d.max_invalid_fraction,
            )
            if too_many:
                raise DataFormatError(too_many)


def where_from(locators: dict):
    """(source_id, source_row) -> 'file:line'."""
    return lambda source_id, source_row: locators[source_id](source_row)
