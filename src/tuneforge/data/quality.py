"""Quality filters on normalised rows, run batched; each rule counts the rows it removes, with examples.

A row is charged to the first rule it fails, in the order of `RULES`, so the counts add up to the
number of rows removed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import datasets

from tuneforge.config.schema import QualityConfig
from tuneforge.data.formats import column

RULES = (
    "min_score",
    "min_response_chars",
    "max_response_chars",
    "min_prompt_chars",
    "max_garbage_char_frac",
    "max_repeated_line_frac",
    "max_repeated_ngram_frac",
)
GARBAGE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
EXAMPLES_PER_RULE = 3


def prompt_and_response(messages: list[dict], text: str) -> tuple[str, str]:
    """(prompt, response) of a normalised row: non-assistant turns vs assistant turns (a tool call's text is its
    call, as JSON); completion = response."""
    if not messages:
        return "", text
    prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    response = "\n".join(m["content"] or m.get("tool_calls") or "" for m in messages if m["role"] == "assistant")
    return prompt, response


def repeated_line_frac(text: str) -> float:
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if len(lines) >= 3 else 0.0


def repeated_ngram_frac(text: str, n: int = 3) -> float:
    words = text.split()
    grams = list(zip(*(words[i:] for i in range(n))))
    return (len(grams) - len(set(grams))) / len(grams) if len(grams) >= 10 else 0.0


def garbage_frac(text: str) -> float:
    return len(GARBAGE.findall(text)) / len(text) if text else 0.0


def failed_rule(prompt: str, response: str, score: float | None, q: QualityConfig) -> str:
    """The first rule the row fails, or '' when it passes every filter."""
    if q.score_column is not None and q.min_score is not None and (score is None or not score > q.min_score):
        return "min_score"
    r = response.strip()
    if len(r) < q.min_response_chars:
        return "min_response_chars"
    if q.max_response_chars is not None and len(r) > q.max_response_chars:
        return "max_response_chars"
    if prompt and len(prompt.strip()) < q.min_prompt_chars:
        return "min_prompt_chars"
    whole = f"{prompt}\n{response}"
    if q.max_garbage_char_frac is not None and garbage_frac(whole) > q.max_garbage_char_frac:
        return "max_garbage_char_frac"
    if q.max_repeated_line_frac is not None and repeated_line_frac(response) > q.max_repeated_line_frac:
        return "max_repeated_line_frac"
    if q.max_repeated_ngram_frac is not None and repeated_ngram_frac(response) > q.max_repeated_ngram_frac:
        return "max_repeated_ngram_frac"
    return ""


def failed_rules(messages: list[list[dict]], texts: list[str], scores: list | None, q: QualityConfig) -> list[str]:
    """`failed_rule` of many rows ('' for the rows that pass)."""
    scores = scores or [None] * len(texts)
    return [failed_rule(*prompt_and_response(m, t), s, q) for m, t, s in zip(messages, texts, scores)]


def apply_quality_filters(
    ds: datasets.Dataset,
    q: QualityConfig,
    num_proc: int | None = None,
    reasons: list[str] | None = None,
    locate: Callable[[int], str] | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Drop rows failing any rule. Returns (kept rows, {rule: {removed, examples}}). `reasons`: the rows'
    `failed_rules` when already judged (prepare judges them in the same pass that hashes rows for dedup).
    Each example says where its row is: `locate(i)` ('file:line'), else its 1-based row number."""
    if reasons is None:
        # only the verdicts are written back; tuneforge caches the stage itself (no fingerprint hashing)
        judged = ds.map(
            lambda b: {"_drop": failed_rules(b["messages"], b["text"], b.get("score"), q)},
            batched=True,
            batch_size=1000,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            desc="quality filters",
            new_fingerprint=uuid.uuid4().hex,
        )
        reasons = column(judged, "_drop")
    report: dict = {}
    for i, reason in enumerate(reasons):
        if not reason:
            continue
        entry = report.setdefault(reason, {"removed": 0, "examples": []})
        entry["removed"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_RULE:
            _, response = prompt_and_response(ds[i]["messages"], ds[i]["text"])
            where = {"where": locate(i)} if locate else {"row": i + 1}
            entry["examples"].append({**where, "response": response[:120]})
    keep = [i for i, r in enumerate(reasons) if not r]
    kept = ds.select(keep, new_fingerprint=uuid.uuid4().hex) if len(keep) < len(ds) else ds
    return kept, report
