"""Invalid rows: how they are counted in the report, and when there are too many to go on.

With `data.skip_invalid`, a malformed row (unreadable line, wrong field type, missing field, a row of another
format, a row the chat template refuses) is skipped and counted: {"skipped": n, "reasons": {reason: n},
"examples": ["file:line: why", ...]}. When more than `data.max_invalid_fraction` of one source's rows are
invalid, the data is more likely read the wrong way (wrong format, wrong columns) than a few bad rows: the run
stops and says so.
"""

from __future__ import annotations

EXAMPLES = 5
SKIP_HINT = "fix the row, or set data.skip_invalid: true to skip such rows (counted in the data report)"


def empty() -> dict:
    return {"skipped": 0, "reasons": {}, "examples": []}


def add(invalid: dict, reason: str, example: str, n: int = 1) -> None:
    """Count `n` invalid rows for `reason`; keep `example` ('file:line: why') among the first few."""
    invalid["skipped"] += n
    invalid["reasons"][reason] = invalid["reasons"].get(reason, 0) + n
    if len(invalid["examples"]) < EXAMPLES:
        invalid["examples"].append(example)


def merge(into: dict, other: dict) -> None:
    into["skipped"] += other["skipped"]
    for reason, n in other["reasons"].items():
        into["reasons"][reason] = into["reasons"].get(reason, 0) + n
    into["examples"] = (into["examples"] + other["examples"])[:EXAMPLES]


def too_many(name: str, n_invalid: int, n_rows: int, examples: list[str], max_fraction: float) -> str | None:
    """The error message when more than `max_fraction` of a source's `n_rows` rows are invalid, else None."""
    if n_rows <= 0 or n_invalid / n_rows <= max_fraction:
        return None
    first = "; ".join(examples[:3]) or "none recorded"
    return (
        f"{name}: {n_invalid} of {n_rows} rows are invalid ({100 * n_invalid / n_rows:.0f}%), more than "
        f"data.max_invalid_fraction={max_fraction:g} of a source, so the run stops rather than train on what is left. "
        f"First reasons: {first}. Fix those rows; if most rows are reported as another format or missing a field, "
        "set the source's `format:` or map its fields with `columns:`; to train on the valid rows anyway, raise "
        "data.max_invalid_fraction"
    )
