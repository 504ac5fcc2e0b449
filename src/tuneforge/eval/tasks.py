"""Generation-based task metrics on held-out rows: exact match (raw and normalised)."""

from __future__ import annotations

from tuneforge.data.dedup import normalize_text as normalize_answer


def exact_match(predictions: list[str], references: list[str], normalized: bool = False) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    f = normalize_answer if normalized else str.strip
    return sum(f(p) == f(r) for p, r in zip(predictions, references)) / len(references)
