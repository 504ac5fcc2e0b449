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


def _marked(tokenizer: PreTrainedTokenizerBase, ids: list[int], color: bool) -> str:
    """Completion tokens (all trained), marked as trained."""
    return render_row(tokenizer, ids, ids, color) if ids else ""


def row_preview(tokenizer: PreTrainedTokenizerBase, row: dict, k: int, color: bool) -> str:
    """One prepared row for `tuneforge data preview`: a header line, then the row with its trained tokens
    marked. SFT rows show input_ids; preference rows the prompt once, then the chosen and the rejected reply;
    KTO rows the prompt, then the completion with its label."""
    if "chosen_ids" in row or "completion_ids" in row:
        prompt = tokenizer.decode(row["prompt_ids"])
        names = ("chosen", "rejected") if "chosen_ids" in row else ("completion",)
        label = "" if "label" not in row else f", label {'desirable' if row['label'] else 'undesirable'}"
        sizes = ", ".join(f"{n} {len(row[f'{n}_ids'])}" for n in names)
        out = [f"\n--- row {k}: prompt {len(row['prompt_ids'])} tokens, {sizes} trained{label} ---", prompt]
        for n in names:
            out += [f"--- {n}:", _marked(tokenizer, row[f"{n}_ids"], color)]
        return "\n".join(out)
    trained = sum(1 for x in row["labels"][1:] if x != IGNORE_INDEX)
    head = f"\n--- row {k}: {len(row['input_ids'])} tokens, {trained} trained ---"
    return head + "\n" + render_row(tokenizer, row["input_ids"], row["labels"], color)
