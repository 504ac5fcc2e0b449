"""Tokenize a dataset of normalised rows (ids + labels), then truncate or drop rows: the tokenize stage.

Chat rows are rendered with their loss masks (templates.py, masks.py), completion rows are trained whole.
Rows go in chunks through two overlapping halves: a background thread runs only the Rust tokenizer, chunk
after chunk (it releases the GIL and, with its parallelism on, uses every core), while the main thread
renders the next chunk and turns the previous one into ids, labels and truncated rows. The tokens stay in
per-chunk arrays, which become the chunks of the Arrow columns (never one copy of all tokens).

Rendering and labels are the Python part, about a fifth of the work; the Rust part spreads over every
core by itself. So one process is the fastest up to a few cores, and `num_proc` >= WORKER_PROCESSES_FROM
splits the rows between that many worker processes instead (`datasets.map`), each running the same
overlap on its share with the Rust threads off, and handing back Arrow columns rather than Python lists.
(Measured on 2 cores: two worker processes spent 20% more CPU than one process for the same rows.)
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuneforge.config.schema import DataConfig
from tuneforge.data.formats import DataFormatError
from tuneforge.data.invalid import SKIP_HINT
from tuneforge.data.masks import (
    TokenizedRows,
    backend_as_called,
    chats_tokenized,
    encode_texts,
    leading_bos,
    monotone_offsets,
    split_leading_bos,
    texts_tokenized,
    with_bos,
)
from tuneforge.data.templates import IGNORE_INDEX, TemplateError, chats_rendered

CHUNK_ROWS = 512
WORKER_PROCESSES_FROM = 4  # num_proc from which worker processes tokenize (below: one process, Rust on every core)
WORKER_BATCH_ROWS = 8192  # rows per map call in a worker (a few chunks each, so the overlap pays)


def tokenize_rows(
    tokenizer, template: str, chunks: Iterable[tuple[list[list[dict]], list[str]]], train_on: str
) -> TokenizedRows:
    """Ids and labels of every row of every (messages, texts) chunk, in order: a row with messages is a chat
    (template + masks), a row without is a completion text (all trained, EOS appended)."""
    return TokenizedRows.concat(tokenize_chunks(tokenizer, template, chunks, train_on))


def tokenize_chunks(
    tokenizer,
    template: str,
    chunks: Iterable[tuple[list[list[dict]], list[str]]],
    train_on: str,
    shape: Callable[[TokenizedRows], Any] | None = None,
    refused: dict[int, str] | None = None,
) -> list:
    """`tokenize_rows` chunk by chunk: each chunk's TokenizedRows, or `shape(it)` (computed while the next
    chunk is tokenized). `refused`: see `chats_rendered`; a row the template refuses becomes an empty row (no
    tokens) and its index among all rows -> the template's message goes in `refused`.

    Labels of the first chunk with chats come from every token's offsets; when those never decrease within
    a text (as for Hugging Face fast tokenizers, whose offsets follow the text), the later chunks find their
    trained tokens by bisection instead (`masks._labels_by_search`): the same labels, without reading
    every token's offsets."""
    bos = leading_bos(tokenizer)  # see masks.py: BOS written as text is split off and put back as its id
    backend = backend_as_called(tokenizer)  # (after any tokenizer call: it leaves the backend as calls set it)
    parts: list = []
    pending: deque = deque()
    search: bool | None = None  # decided on the first chunk with chats

    def finish() -> None:
        nonlocal search
        chat_idx, plain_idx, texts, rendered, spans, bos_rows, future = pending.popleft()
        chats = None
        if chat_idx:
            encoded = encode_texts(tokenizer, backend, rendered, future.result() if future else None)
            if search is None and train_on != "all":
                search = encoded.encodings is not None and monotone_offsets(encoded)
            chats = with_bos(
                chats_tokenized(tokenizer, backend, rendered, spans, train_on, encoded, search=bool(search)),
                bos_rows,
                tokenizer.bos_token_id,
            )
        plain = texts_tokenized(tokenizer, [texts[k] for k in plain_idx]) if plain_idx else None
        part = chats if plain is None else plain if chats is None else _merge(chats, chat_idx, plain)
        parts.append(shape(part) if shape else part)

    first_row = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for messages, texts in chunks:
            chat_idx = [k for k, m in enumerate(messages) if m]
            plain_idx = [k for k, m in enumerate(messages) if not m]
            chunk_refused: dict[int, str] | None = {} if refused is not None else None
            rendered, spans = chats_rendered(
                tokenizer, template, [messages[k] for k in chat_idx], train_on, chunk_refused
            )
            for k, message in (chunk_refused or {}).items():
                refused[first_row + chat_idx[k]] = message
            first_row += len(messages)
            rendered, spans, bos_rows = split_leading_bos(rendered, spans, bos)
            # the background thread only runs Rust (GIL released): back to back, while this thread does the Python
            future = (
                pool.submit(backend.encode_batch, rendered, add_special_tokens=False) if chat_idx and backend else None
            )
            pending.append((chat_idx, plain_idx, texts, rendered, spans, bos_rows, future))
            if len(pending) > 1:  # the previous chunk's labels while this one is tokenized
                finish()
        while pending:
            finish()
    return parts


def _merge(chats: TokenizedRows, chat_idx: list[int], plain: TokenizedRows) -> TokenizedRows:
    """Chat rows and completion rows of one chunk back in row order."""
    is_chat = np.zeros(len(chats.lengths) + len(plain.lengths), dtype=bool)
    is_chat[chat_idx] = True
    lengths = np.zeros(len(is_chat), dtype=np.int64)
    lengths[is_chat], lengths[~is_chat] = chats.lengths, plain.lengths
    token_is_chat = np.repeat(is_chat, lengths)
    ids, labels = np.empty(int(lengths.sum()), np.int64), np.empty(int(lengths.sum()), np.int64)
    ids[token_is_chat], ids[~token_is_chat] = chats.ids, plain.ids
    labels[token_is_chat], labels[~token_is_chat] = chats.labels, plain.labels
    return TokenizedRows(ids, labels, lengths)


def list_column(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> Arrow column from per-row lengths and flat values (large_list past 2**31 values)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, value_type))


def ids_type(ids: np.ndarray) -> pa.DataType:
    """int32 token ids when they fit (what `datasets` stores `input_ids` as), else int64."""
    return pa.int32() if not len(ids) or (ids.min() >= -(2**31) and ids.max() < 2**31) else pa.int64()


def _row_chunks(ds: datasets.Dataset) -> Iterator[tuple[list, list]]:
    """(messages, texts) of the dataset's rows, CHUNK_ROWS at a time. Rows picked by an earlier `select`
    (quality filters, dedup) in ascending order are read as contiguous blocks of the table, the dropped rows
    skipped in Python: Arrow's `take` on list columns costs 6x more than reading the whole block."""
    rows = ds.select_columns(["messages", "text"])
    indices = getattr(rows, "_indices", None)  # datasets' row mapping after a select (None: the table's order)
    picked = indices.column(0).to_numpy().astype(np.int64) if indices is not None else None
    if picked is None or (len(picked) > 1 and np.any(np.diff(picked) < 0)):
        for batch in rows.iter(batch_size=CHUNK_ROWS):
            yield batch["messages"], batch["text"]
        return
    table = rows.data.table
    for start in range(0, len(picked), CHUNK_ROWS):
        at = picked[start : start + CHUNK_ROWS]
        span = int(at[-1]) - int(at[0]) + 1
        if span > 2 * len(at):  # few rows kept here: taking them is cheaper
            block = table.take(pa.array(at))
            yield block.column("messages").to_pylist(), block.column("text").to_pylist()
            continue
        block = table.slice(int(at[0]), span)
        messages, texts = block.column("messages").to_pylist(), block.column("text").to_pylist()
        at = (at - at[0]).tolist()
        yield [messages[k] for k in at], [texts[k] for k in at]


def _chunked(messages: list, texts: list) -> Iterator[tuple[list, list]]:
    for start in range(0, len(messages), CHUNK_ROWS):
        yield messages[start : start + CHUNK_ROWS], texts[start : start + CHUNK_ROWS]


def _worker_tokenize(batch: pa.Table, tokenizer, template: str, train_on: str) -> pa.Table:
    """One worker's batch of rows as Arrow columns (the map function of `tokenize_dataset`); `_refused`: the
    template's message for a row it refused, else ''."""
    # the worker processes share the cores: Rust threads of their own would only fight each other
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    chunks = _chunked(batch.column("messages").to_pylist(), batch.column("text").to_pylist())
    refused: dict[int, str] = {}
    enc = TokenizedRows.concat(tokenize_chunks(tokenizer, template, chunks, train_on, refused=refused))
    return pa.table(
        {
            "input_ids": list_column(enc.lengths, enc.ids, pa.int64()),
            "labels": list_column(enc.lengths, enc.labels, pa.int64()),
            "_refused": pa.array([refused.get(k, "") for k in range(batch.num_rows)], pa.string()),
        }
    )


def restore_tokenizers_parallelism() -> None:
    """Make the process environment say what `os.environ` says about TOKENIZERS_PARALLELISM again.

    `datasets.map(num_proc=...)` sets TOKENIZERS_PARALLELISM=false for its workers and then restores only
    Python's mapping (`os.environ = copy`), not the process environment the Rust tokenizer reads: after any
    such map (read, quality filters, dedup) this process would tokenize on one core for good."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    if value is None:
        os.unsetenv("TOKENIZERS_PARALLELISM")
    else:
        os.putenv("TOKENIZERS_PARALLELISM", value)


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    template: str,
    train_on: str,
    num_proc: int | None,
    desc: str = "tokenize",
    shape: Callable[[TokenizedRows], Any] | None = None,
    refused: dict[int, str] | None = None,
) -> list:
    """`tokenize_chunks` of a dataset with `messages` and `text` columns: in this process, or in `num_proc`
    worker processes from WORKER_PROCESSES_FROM of them (then one part for all rows). `refused`: see
    `tokenize_chunks` (without it, a row the template refuses raises TemplateError)."""
    rows = ds.select_columns(["messages", "text"])
    if not num_proc or num_proc < WORKER_PROCESSES_FROM or len(ds) < num_proc * CHUNK_ROWS:
        restore_tokenizers_parallelism()
        return tokenize_chunks(tokenizer, template, _row_chunks(ds), train_on, shape, refused)
    enc = rows.with_format("arrow").map(
        _worker_tokenize,
        batched=True,
        batch_size=min(WORKER_BATCH_ROWS, -(-len(ds) // num_proc)),
        num_proc=num_proc,
        remove_columns=["messages", "text"],
        fn_kwargs={"tokenizer": tokenizer, "template": template, "train_on": train_on},
        desc=desc,
        new_fingerprint=uuid.uuid4().hex,
    )  # tuneforge caches the stage itself; skip hashing the tokenizer
    table = enc.data.table
    for k, message in enumerate(table.column("_refused").to_pylist()):
        if message and refused is None:
            raise TemplateError(f"the chat template refused a conversation: {message}")
        if message:
            refused[k] = message
    ids_col, labels_col = table.column("input_ids"), table.column("labels")
    part = TokenizedRows(
        pc.list_flatten(ids_col).to_numpy(zero_copy_only=False),
        pc.list_flatten(labels_col).to_numpy(zero_copy_only=False),
        pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64),
    )
    return [shape(part) if shape else part]


def trained_per_row(labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Trained tokens of each row of flat labels, not counting its first position (never a target)."""
    nonempty = lengths > 0
    starts = (np.cumsum(lengths) - lengths)[nonempty]
    trained = np.zeros(len(lengths), dtype=np.int64)
    if len(starts):
        is_trained = (labels != IGNORE_INDEX).view(np.uint8)
        trained[nonempty] = np.add.reduceat(is_trained, starts, dtype=np.int64) - is_trained[starts]
    return trained


@dataclass
class Cut:
    """One chunk's rows after `cut_rows`."""

    rows: TokenizedRows  # the kept rows, truncated to max_seq_len
    trained: np.ndarray  # trained tokens of each kept row (position 0 never counts)
    kept: np.ndarray  # bool, per row of the chunk
    truncated: np.ndarray  # bool, per row of the chunk: longer than max_seq_len


def cut_rows(enc: TokenizedRows, max_len: int, overlong: str, min_tokens: int) -> Cut:
    """Truncate (overlong: truncate) or drop (overlong: drop) rows longer than max_len, and drop rows shorter
    than min_tokens or with nothing to train."""
    lengths, ids, labels = enc.lengths, enc.ids, enc.labels
    truncated = lengths > max_len
    if overlong == "truncate" and truncated.any():
        keep_token = np.ones(len(ids), dtype=bool)
        for start, n in zip(enc.offsets[:-1][truncated].tolist(), lengths[truncated].tolist()):
            keep_token[start + max_len : start + n] = False
        ids, labels, lengths = ids[keep_token], labels[keep_token], np.minimum(lengths, max_len)
    trained = trained_per_row(labels, lengths)
    keep = ~(truncated & (overlong == "drop")) & (trained > 0) & (lengths >= min_tokens)
    if not keep.all():
        keep_token = np.repeat(keep, lengths)
        ids, labels, lengths, trained = ids[keep_token], labels[keep_token], lengths[keep], trained[keep]
    return Cut(TokenizedRows(ids, labels, lengths), trained, keep, truncated)


def tokenize_split(
    ds: datasets.Dataset,
    tok,
    template: str,
    d: DataConfig,
    split: str,
    source_columns: bool = True,
    locate: Callable[[int, int], str] | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenize every row (ids + labels), then truncate or drop over-long rows and drop rows too short or with
    nothing to train (`cut_rows`, chunk by chunk). The result has input_ids, labels, num_tokens, num_trained,
    after the source columns unless `source_columns` is False (packing keeps only the tokens); its token
    columns are Arrow arrays of one chunk per tokenized chunk (never concatenated in memory).

    A row the chat template refuses is a DataFormatError naming its file:line (`locate(source_id, source_row)`)
    and the template's message; with d.skip_invalid it is dropped and counted in the report's
    `template_errors` {skipped, reasons, examples, by_source}."""
    refused: dict[int, str] = {}
    cuts = tokenize_dataset(
        ds,
        tok,
        template,
        d.train_on,
        d.num_proc,
        desc=f"tokenize {split}",
        shape=lambda enc: cut_rows(enc, d.max_seq_len, d.overlong, d.quality.min_tokens),
        refused=refused,
    )
    template_errors = _refused_rows(ds, refused, locate, d.skip_invalid)
    parts = [c.rows for c in cuts]
    keep, truncated, trained = (
        _joined(cuts, f, t) for f, t in (("kept", bool), ("truncated", bool), ("trained", np.int64))
    )
    lengths = _joined(parts, "lengths", np.int64)
    bounds = [v for p in parts if len(p.ids) for v in (p.ids.min(), p.ids.max())]
    id_type = ids_type(np.array(bounds, dtype=np.int64))
    columns = {
        "input_ids": _list_chunks(parts, "ids", id_type),
        "labels": _list_chunks(parts, "labels", pa.int64()),
        "num_tokens": pa.array(lengths, pa.int64()),
        "num_trained": pa.array(trained, pa.int64()),
    }
    kept = (
        _with_source_columns(ds, np.flatnonzero(keep), columns)
        if source_columns
        else datasets.Dataset(pa.table(columns), fingerprint=uuid.uuid4().hex)
    )
    n_truncated = int(truncated.sum())
    dropped_overlong = n_truncated if d.overlong == "drop" else 0
    sorted_lengths = np.sort(lengths)
    report = {
        "rows_in": len(ds),
        "rows": len(kept),
        "tokens": int(lengths.sum()),
        "trained_tokens": int(trained.sum()),
        "truncated_rows": n_truncated if d.overlong == "truncate" else 0,
        "dropped_overlong_rows": dropped_overlong,
        "dropped_short_or_untrained_rows": len(ds) - len(kept) - dropped_overlong - len(refused),
        "length": {
            "min": int(sorted_lengths[0]) if len(lengths) else 0,
            "median": int(sorted_lengths[len(lengths) // 2]) if len(lengths) else 0,
            "p95": int(sorted_lengths[int(0.95 * (len(lengths) - 1))]) if len(lengths) else 0,
            "max": int(sorted_lengths[-1]) if len(lengths) else 0,
        },
    }
    report["trained_fraction"] = report["trained_tokens"] / max(report["tokens"], 1)
    if template_errors:
        report["template_errors"] = template_errors
    return kept, report


def _refused_rows(ds: datasets.Dataset, refused: dict[int, str], locate, skip_invalid: bool) -> dict | None:
    """The rows the chat template refused: raise for the first (strict), or count them (skip_invalid)."""
    if not refused:
        return None
    cols = [c for c in ("source_id", "source_row") if c in ds.column_names]
    info = ds.select_columns(cols).select(sorted(refused))[:] if cols else {}
    out: dict = {"skipped": 0, "reasons": {}, "examples": [], "by_source": {}}
    for j, i in enumerate(sorted(refused)):
        sid = info["source_id"][j] if "source_id" in info else 0
        srow = info["source_row"][j] if "source_row" in info else i
        where = locate(sid, srow) if locate else f"row {i + 1}"
        message = f"{where}: the chat template refused this row: {refused[i]}"
        if not skip_invalid:
            more = f" ({len(refused) - 1} more rows refused)" if len(refused) > 1 else ""
            raise DataFormatError(f"{message}{more}; {SKIP_HINT}, or choose another data.chat_template")
        reason = f"refused by the chat template: {refused[i]}"
        out["skipped"] += 1
        out["reasons"][reason] = out["reasons"].get(reason, 0) + 1
        out["by_source"][str(sid)] = out["by_source"].get(str(sid), 0) + 1
        if len(out["examples"]) < 5:
            out["examples"].append(message)
    return out


def _list_chunks(parts: list[TokenizedRows], field: str, value_type: pa.DataType) -> pa.ChunkedArray:
    """A list column with one chunk per part (no copy of all the tokens into one buffer)."""
    chunks = [list_column(p.lengths, getattr(p, field), value_type) for p in parts]
    return pa.chunked_array(chunks, chunks[0].type if chunks else pa.list_(value_type))


def _joined(items: list, field: str, dtype) -> np.ndarray:
    return np.concatenate([np.zeros(0, dtype), *(getattr(x, field) for x in items)])


def _with_source_columns(ds: datasets.Dataset, rows: np.ndarray, columns: dict[str, pa.Array]) -> datasets.Dataset:
    """The kept rows of `ds` with the tokenized columns after its own (in memory; save_to_disk writes them)."""
    table = (
        ds.with_format("arrow")[:]
        if len(rows) == len(ds)
        else ds.with_format("arrow")[rows.tolist()]
        if len(rows)
        else ds.with_format("arrow")[:0]
    )
    for name, col in columns.items():
        table = table.append_column(name, col)
    features = datasets.Features(
        {
            **ds.features,
            **datasets.Features.from_arrow_schema(pa.schema([pa.field(n, c.type) for n, c in columns.items()])),
        }
    )
    return datasets.Dataset(
        table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features), fingerprint=uuid.uuid4().hex
    )
