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
and num_tokens (all tokens of the row), num_trained (completion tokens), then the source columns (messages,
chosen/rejected or completion/label, source_id, source_row) for preview.

Over-long rows (prompt + longest completion > data.max_seq_len): `overlong: truncate` keeps the prompt's last
tokens (at least half of max_seq_len, more when the completions are short) and cuts the completions at the end,
so every sequence fits; `overlong: drop` drops the row. Both are counted in the report.
"""

from __future__ import annotations

import datasets
import numpy as np

from tuneforge.config.schema import DataConfig
from tuneforge.data.encode import _refused_rows, tokenize_chunks
from tuneforge.data.masks import TokenizedRows
from tuneforge.data.preference import COMPLETIONS
from tuneforge.data.templates import IGNORE_INDEX

CHUNK_ROWS = 512


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
    """Tokenize every preference (kind 'preference') or KTO ('kto') row. Returns (rows, report, the length
    of each kept row's longest sequence: prompt + its longest completion)."""
    names = COMPLETIONS[kind]
    cols = ds.select_columns(["messages", *names])[:]
    refused: dict[int, str] = {}
    done = {n: _tokenized(tok, template, cols["messages"], cols[n], refused) for n in names}
    template_errors = _refused_rows(ds, refused, locate, d.skip_invalid)
    out: dict[str, list] = {"prompt_ids": [], **{f"{n}_ids": [] for n in names}}
    kept, lengths, truncated, dropped_long, dropped_short, mismatch = [], [], 0, 0, 0, {}
    prompt_tokens = trained = 0
    for i in range(len(ds)):
        if i in refused:
            continue
        parts = [split_prompt(*done[n][i]) for n in names]
        if any(p is None for p in parts) or any(p[0] != parts[0][0] for p in parts):
            mismatch[i] = "the chat template renders the prompt differently before the chosen and rejected replies"
            continue
        prompt, completions = parts[0][0], [p[1] for p in parts]
        if len(prompt) + max(map(len, completions)) > d.max_seq_len:
            if d.overlong == "drop":
                dropped_long += 1
                continue
            truncated += 1
            prompt, completions = fit(prompt, completions, d.max_seq_len)
        if len(prompt) + min(map(len, completions)) < d.quality.min_tokens:
            dropped_short += 1
            continue
        kept.append(i)
        out["prompt_ids"].append(prompt)
        for n, c in zip(names, completions):
            out[f"{n}_ids"].append(c)
        lengths.append(len(prompt) + max(map(len, completions)))
        prompt_tokens += len(prompt)
        trained += sum(map(len, completions))
    if mismatch:
        template_errors = _refused_rows(ds, {**refused, **mismatch}, locate, d.skip_invalid)
    ids = datasets.Sequence(datasets.Value("int32"))
    features = {k: ids for k in out}
    n_tokens = [len(p) + sum(len(out[f"{n}_ids"][j]) for n in names) for j, p in enumerate(out["prompt_ids"])]
    out["num_tokens"] = n_tokens
    out["num_trained"] = [t - len(p) for t, p in zip(n_tokens, out["prompt_ids"])]
    features.update(num_tokens=datasets.Value("int64"), num_trained=datasets.Value("int64"))
    if kind == "kto":
        out["label"] = [bool(x) for x in ds.select_columns(["label"]).select(kept)[:]["label"]] if kept else []
        features["label"] = datasets.Value("bool")
    if source_columns:
        source = ds.select(kept) if kept else ds.select([])
        for c in source.column_names:
            if c not in out:
                out[c] = source.select_columns([c])[:][c]
                features[c] = source.features[c]
    rows = datasets.Dataset.from_dict(out, features=datasets.Features(features))
    report = _report(len(ds), rows, lengths, prompt_tokens, trained, truncated, dropped_long, dropped_short, d)
    report["prompt_tokens"] = prompt_tokens
    if kind == "preference":
        report["pairs"] = len(rows)
        report["chosen_tokens"] = int(sum(map(len, out["chosen_ids"])))
        report["rejected_tokens"] = int(sum(map(len, out["rejected_ids"])))
    else:
        report["desirable"] = int(sum(out["label"]))
        report["undesirable"] = len(rows) - report["desirable"]
    if template_errors:
        report["template_errors"] = template_errors
    return rows, report, lengths


def _report(rows_in, rows, lengths, prompt_tokens, trained, truncated, dropped_long, dropped_short, d) -> dict:
    s = np.sort(np.asarray(lengths, dtype=np.int64))
    tokens = prompt_tokens + trained
    return {
        "rows_in": rows_in,
        "rows": len(rows),
        "tokens": int(tokens),
        "trained_tokens": int(trained),
        "trained_fraction": trained / max(tokens, 1),
        "truncated_rows": truncated,
        "dropped_overlong_rows": dropped_long,
        "dropped_short_or_untrained_rows": dropped_short,
        "length": {  # of each row's longest sequence (prompt + its longest completion)
            "min": int(s[0]) if len(s) else 0,
            "median": int(s[len(s) // 2]) if len(s) else 0,
            "p95": int(s[int(0.95 * (len(s) - 1))]) if len(s) else 0,
            "max": int(s[-1]) if len(s) else 0,
        },
    }
