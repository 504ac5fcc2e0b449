"""The error of a row that does not fit its format, and how its values are named in messages."""

from __future__ import annotations

import json
from typing import Any


class RowError(ValueError):
    """A row that does not fit its format. `reason` is what is counted (same for alike rows); str(self) adds
    the offending value."""

    def __init__(self, reason: str, value: str = ""):
        super().__init__(reason + value)
        self.reason = reason


def kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def shown(value: Any) -> str:
    """A short rendering of a value for an error message: ' (...)'."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return f" ({text[:60]}{'...' if len(text) > 60 else ''})"
