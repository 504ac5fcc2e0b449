"""Best-fit-decreasing packing of tokenized samples into rows of at most `capacity` tokens.

Samples stay whole (over-long ones were truncated or dropped before). Each packed row carries
`position_ids` restarting at 0 for every sample, from which attention keeps samples apart
(transformers builds a block-diagonal causal mask from them for SDPA/eager, and uses them as
sequence boundaries for flash-attention). The first token of every sample is never a target,
exactly as in unpacked training where position 0 has no predecessor.
"""

from __future__ import annotations

import bisect
import uuid
from itertools import chain

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuneforge.data.templates import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity (longest first, tightest bin)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens exceeds the row capacity {capacity}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


def _list_column(offsets: np.ndarray, values: np.ndarray, value_type) -> pa.ChunkedArray:
    """A list<value_type> column from row offsets and flat values (chunks of < 2**31 values: int32 offsets)."""
    chunks, first, n = [], 0, len(offsets) - 1
    while True:
        last = int(np.searchsorted(offsets, offsets[first] + (1 << 31) - 1, side="right")) - 1
        last = min(max(last, first + 1), n)  # at least one row per chunk
        chunks.append(
            pa.ListArray.from_arrays(
                pa.array(offsets[first : last + 1] - offsets[first], pa.int32()),
                pa.array(values[offsets[first] : offsets[last]], value_type),
            )
        )
        first = last
        if first >= n:
            return pa.chunked_array(chunks, pa.list_(value_type))


def _samples(col: pa.ChunkedArray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A list column's samples as (values of each chunk, the chunk of each sample, its start in those values):
    slices of the column's own buffers, whatever its chunks."""
    values, chunk_of, start_of = [], [], []
    for k, chunk in enumerate(col.chunks):
        n = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)
        values.append(pc.list_flatten(chunk).to_numpy(zero_copy_only=False))
        chunk_of.append(np.full(len(n), k, dtype=np.int64))
        start_of.append(np.cumsum(n) - n)
    return (
        values,
        np.concatenate([np.zeros(0, np.int64), *chunk_of]),
        np.concatenate([np.zeros(0, np.int64), *start_of]),
    )


def _gather(col: pa.ChunkedArray, order: np.ndarray, lengths: list[int]) -> np.ndarray:
    """The values of samples `order` (of `lengths` tokens), concatenated in that order."""
    values, chunk_of, start_of = _samples(col)
    empty = values[0][:0] if values else np.zeros(0, col.type.value_type.to_pandas_dtype())
    return np.concatenate(
        [empty, *(values[c][s : s + n] for c, s, n in zip(chunk_of[order].tolist(), start_of[order].tolist(), lengths))]
    )


def pack_dataset(ds: datasets.Dataset, capacity: int) -> tuple[datasets.Dataset, dict]:
    """Pack a tokenized dataset (input_ids, labels) into rows with position_ids and seq_lens.

    Works on flat numpy arrays: each sample is one slice of its column's buffers, and the packed values
    are the concatenation of those slices in packed order; no per-token Python."""
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    ids_col, labels_col = table.column("input_ids"), table.column("labels")
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    sample_len = lengths[order]  # samples in packed order
    n_list = sample_len.tolist()
    packed_ids = _gather(ids_col, order, n_list)
    packed_labels = _gather(labels_col, order, n_list)
    positions = np.arange(max(n_list, default=0), dtype=np.int64)
    within = np.concatenate([positions[:0], *(positions[:n] for n in n_list)])  # position inside its sample
    dst_start = np.cumsum(sample_len) - sample_len
    packed_labels[dst_start[sample_len > 0]] = IGNORE_INDEX  # a sample's first token has no predecessor in it
    per_row = np.fromiter(map(len, bins), dtype=np.int64, count=len(bins))
    sample_off = np.concatenate([[0], np.cumsum(per_row)])
    row_off = np.concatenate([[0], np.cumsum(sample_len)])[sample_off]
    is_trained = (packed_labels != IGNORE_INDEX).view(np.uint8)
    trained = np.zeros(len(bins), dtype=np.int64)  # per row (reduceat over the rows with tokens)
    nonempty = np.diff(row_off) > 0
    if nonempty.any():
        trained[nonempty] = np.add.reduceat(is_trained, row_off[:-1][nonempty], dtype=np.int64)
    packed = datasets.Dataset(
        pa.table(
            {
                "input_ids": _list_column(row_off, packed_ids, ids_col.type.value_type),
                "labels": _list_column(row_off, packed_labels, labels_col.type.value_type),
                "position_ids": _list_column(row_off, within, pa.int64()),
                "seq_lens": _list_column(sample_off, sample_len, pa.int64()),
                "num_tokens": pa.array(np.diff(row_off), pa.int64()),
                "num_trained": pa.array(trained, pa.int64()),
            }
        ),
        fingerprint=uuid.uuid4().hex,
    )  # a fresh fingerprint: datasets would otherwise hash every token
    tokens = int(lengths.sum())
    report = {
        "samples": len(lengths),
        "rows": len(bins),
        "efficiency": tokens / (len(bins) * capacity) if bins else 0.0,
        "efficiency_unpacked": tokens / (len(lengths) * capacity) if len(lengths) else 0.0,
    }
    return packed, report
