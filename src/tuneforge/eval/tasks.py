"""Generation-based task metrics on held-out rows: exact match (raw and normalised)."""

from __future__ import annotations

import re
import string


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: 'The  answer: 42.' -> 'the answer 42'."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str], normalized: bool = False) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    f = normalize_answer if normalized else str.strip
    return sum(f(p) == f(r) for p, r in zip(predictions, references)) / len(references)
