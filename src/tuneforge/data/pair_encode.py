"""Tokenize preference pairs and KTO rows: `prompt_ids` once per row, then each completion's tokens.

Each completion is tokenized as the SFT stage tokenizes the conversation `prompt + [assistant reply]` (the
same chat template, BOS handling and masks, train_on: last): the tokens before the first trained token are
the prompt (the rendered prompt with its generation prompt), the trained run after it is the completion,
up to and including its end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`, or the EOS appended for a
template without one). Template scaffolding after the marker (ChatML's newline) is not trained and not kept.
So `prompt_ids + chosen_ids` is exactly the SFT row's tokens up to its last trained token, and its labels
are `[-100] * len(prompt_ids) + chosen_ids`. The prompt is stored (and forwarded by the objective) once per
pair; both completions must see the same prompt tokens.

Prepared columns:
- preference: prompt_ids, chosen_ids, rejected_ids (list[int]; the completions' tokens all trained),
- kto:        prompt_ids, completion_ids, label (bool),
and num_tokens (all tokens of the row), num_trained (completion tokens), after the source columns (messages,
chosen/rejected or completion/label, source_id, source_row), as the SFT rows' input_ids follow theirs.

Over-long rows (prompt + longest completion > data.max_seq_len): `overlong: truncate` keeps the prompt's last
tokens (at least half of max_seq_len, more when the completions are short) and cuts the completions at the end,
so every sequence fits; `overlong: drop` drops the row. Both are counted in the report.
"""

from __future__ import annotations

import uuid
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuneforge.config.schema import DataConfig
from tuneforge.data.encode import _refused_rows, _with_source_columns, tokenize_chunks
from tuneforge.data.masks import TokenizedRows
from tuneforge.data.preference import COMPLETIONS
from tuneforge.data.templates import IGNORE_INDEX

CHUNK_ROWS = 512  # rows per tokenizer call
BLOCK_ROWS = 8192  # rows whose tokens are held as Python lists at once


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt tokens, completion tokens) of an SFT row with one trained run; None when nothing is trained or
    the trained tokens are not one run."""
    trained = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not trained:
        return None
    first, last = trained[0], trained[-1]
    if last - first + 1 != len(trained):
        return None
    return ids[:first], ids[first : last + 1]


def _tokenized(tok, template: str, prompts: list, replies: list[str], refused: dict[int, str]) -> list:
    """(ids, labels) of every prompt + [assistant reply] conversation as the SFT stage tokenizes it."""
    convs = [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies)]
    chunks = (
        (convs[s : s + CHUNK_ROWS], [""] * len(convs[s : s + CHUNK_ROWS])) for s in range(0, len(convs), CHUNK_ROWS)
    )
    return TokenizedRows.concat(tokenize_chunks(tok, template, chunks, "last", refused=refused)).rows()


def fit(prompt: list[int], completions: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]]]:
    """Truncate so prompt + each completion fits in max_len: the prompt from the left (keeping at least
    max_len // 2 of its tokens, or all that the longest completion leaves room for), the completions from
    the right."""
    longest = max(map(len, completions))
    if len(prompt) + longest <= max_len:
        return prompt, completions
    keep = min(len(prompt), max(max_len - longest, max_len // 2))
    room = max_len - keep
    return prompt[len(prompt) - keep :], [c[:room] for c in completions]


def tokenize_pairs(
    ds: datasets.Dataset,
    tok,
    template: str,
    d: DataConfig,
    kind: str,
    split: str,
    source_columns: bool = True,
    locate=None,
) -> tuple[datasets.Dataset, dict, list[int]]:
    """Tokenize every preference (kind 'preference') or KTO ('kto') row, BLOCK_ROWS rows at a time (the
    tokens of one block are Python lists at once; the result's are Arrow chunks). Returns (rows, report, the
    length of each kept row's longest sequence: prompt + its longest completion)."""
    names = COMPLETIONS[kind]
    token_columns = ["prompt_ids", *(f"{n}_ids" for n in names)]
    chunks: dict[str, list] = {c: [] for c in token_columns}
    refused: dict[int, str] = {}
    kept, lengths, count = [], [], Counter()
    texts = ds.select_columns(["messages", *names])
    for start in range(0, len(ds), BLOCK_ROWS):
        block = texts.select(range(start, min(start + BLOCK_ROWS, len(ds))))[:]
        block_refused: dict[int, str] = {}
        done = {n: _tokenized(tok, template, block["messages"], block[n], block_refused) for n in names}
        refused.update({start + k: m for k, m in block_refused.items()})
        out: dict[str, list] = {c: [] for c in token_columns}
        for k in range(len(block["messages"])):
            if k in block_refused:
                continue
            parts = [split_prompt(*done[n][k]) for n in names]
            if any(p is None for p in parts) or any(p[0] != parts[0][0] for p in parts):
                refused[start + k] = (
                    "the template renders the prompt differently before the chosen and rejected replies"
                )
                continue
            prompt, completions = parts[0][0], [p[1] for p in parts]
            if len(prompt) + max(map(len, completions)) > d.max_seq_len:
                count["truncated" if d.overlong == "truncate" else "dropped_long"] += 1
                if d.overlong == "drop":
                    continue
                prompt, completions = fit(prompt, completions, d.max_seq_len)
            if len(prompt) + min(map(len, completions)) < d.quality.min_tokens:
                count["dropped_short"] += 1
                continue
            kept.append(start + k)
            for c, ids in zip(token_columns, [prompt, *completions]):
                out[c].append(ids)
                count[c] += len(ids)
            lengths.append(len(prompt) + max(map(len, completions)))
        for c in token_columns:
            chunks[c].append(pa.array(out[c], pa.list_(pa.int32())))
    template_errors = _refused_rows(ds, refused, locate, d.skip_invalid)
    columns = {c: pa.chunked_array(chunks[c], pa.list_(pa.int32())) for c in token_columns}
    lens = {c: pc.list_value_length(columns[c]).to_numpy(zero_copy_only=False).astype(np.int64) for c in columns}
    trained = sum((lens[c] for c in token_columns[1:]), np.zeros(len(kept), dtype=np.int64))
    columns["num_tokens"] = pa.array(lens["prompt_ids"] + trained, pa.int64())
    columns["num_trained"] = pa.array(trained, pa.int64())
    if kind == "kto" and not source_columns:  # else among the source columns
        columns["label"] = pa.array(ds.select_columns(["label"]).select(kept)[:]["label"] if kept else [], pa.bool_())
    rows = (
        _with_source_columns(ds, np.asarray(kept, dtype=np.int64), columns)
        if source_columns
        else datasets.Dataset(pa.table(columns), fingerprint=uuid.uuid4().hex)
    )
    prompt_tokens, completion = count["prompt_ids"], sum(count[c] for c in token_columns[1:])
    report = _report(len(ds), rows, lengths, prompt_tokens, completion, count, d)
    report["prompt_tokens"] = prompt_tokens
    if kind == "preference":
        report["pairs"] = len(rows)
        report["chosen_tokens"], report["rejected_tokens"] = count["chosen_ids"], count["rejected_ids"]
    else:
        report["desirable"] = int(sum(rows.select_columns(["label"])[:]["label"]))
        report["undesirable"] = len(rows) - report["desirable"]
    if template_errors:
        report["template_errors"] = template_errors
    return rows, report, lengths


def _report(rows_in: int, rows, lengths: list[int], prompt_tokens: int, trained: int, count: Counter, d) -> dict:
    s = np.sort(np.asarray(lengths, dtype=np.int64))
    tokens = prompt_tokens + trained
    return {
        "rows_in": rows_in,
        "rows": len(rows),
        "tokens": int(tokens),
        "trained_tokens": int(trained),
        "trained_fraction": trained / max(tokens, 1),
        "truncated_rows": count["truncated"],
        "dropped_overlong_rows": count["dropped_long"],
        "dropped_short_or_untrained_rows": count["dropped_short"],
        "length": {  # of each row's longest sequence (prompt + its longest completion)
            "min": int(s[0]) if len(s) else 0,
            "median": int(s[len(s) // 2]) if len(s) else 0,
            "p95": int(s[int(0.95 * (len(s) - 1))]) if len(s) else 0,
            "max": int(s[-1]) if len(s) else 0,
        },
    }
