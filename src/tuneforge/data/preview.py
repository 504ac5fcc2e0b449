"""Show prepared rows with the trained tokens marked, so a loss mask can be checked by eye."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tuneforge.data.templates import IGNORE_INDEX

MARK_OPEN, MARK_CLOSE = "[[", "]]"


def runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Contiguous (trained?, token ids) runs of a row."""
    out: list[tuple[bool, list[int]]] = []
    for i, lab in zip(ids, labels):
        trained = lab != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(i)
        else:
            out.append((trained, [i]))
    return out


def render_row(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], color: bool) -> str:
    """The row's text; trained runs in bold green (color) or between [[ and ]] (plain text)."""
    parts = []
    for trained, chunk in runs(ids, labels):
        text = tokenizer.decode(chunk)
        if trained and color:
            parts.append(f"\x1b[1;32m{text}\x1b[0m")
        elif trained:
            parts.append(f"{MARK_OPEN}{text}{MARK_CLOSE}")
        else:
            parts.append(text)
    return "".join(parts)
