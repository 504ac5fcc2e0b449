"""Best-fit-decreasing packing of tokenized samples into rows of at most `capacity` tokens.

Samples stay whole (over-long ones were truncated or dropped before). Each packed row carries
`position_ids` restarting at 0 for every sample, from which attention keeps samples apart
(transformers builds a block-diagonal causal mask from them for SDPA/eager, and uses them as
sequence boundaries for flash-attention). The first token of every sample is never a target,
exactly as in unpacked training where position 0 has no predecessor.
"""

from __future__ import annotations

import bisect
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
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets[first:last + 1] - offsets[first], pa.int32()),
                                               pa.array(values[offsets[first]:offsets[last]], value_type)))
        first = last
        if first >= n:
            return pa.chunked_array(chunks, pa.list_(value_type))


def pack_dataset(ds: datasets.Dataset, capacity: int) -> tuple[datasets.Dataset, dict]:
    """Pack a tokenized dataset (input_ids, labels) into rows with position_ids and seq_lens.

    Works on flat numpy arrays (one gather for all tokens), not per-token Python."""
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    ids_col, labels_col = (table.column(c).combine_chunks() for c in ("input_ids", "labels"))
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False)
    labels = pc.list_flatten(labels_col).to_numpy(zero_copy_only=False)
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    sample_len = lengths[order]  # samples in packed order
    src_start = np.concatenate([[0], np.cumsum(lengths)])[:-1][order]
    dst_start = np.concatenate([[0], np.cumsum(sample_len)])
    total = int(dst_start[-1])
    dst_start = dst_start[:-1]
    within = np.arange(total, dtype=np.int64) - np.repeat(dst_start, sample_len)  # position inside its sample
    gather = np.repeat(src_start, sample_len) + within
    packed_ids, packed_labels = ids[gather], labels[gather].copy()
    packed_labels[dst_start[sample_len > 0]] = IGNORE_INDEX  # a sample's first token has no predecessor in it
    per_row = np.fromiter(map(len, bins), dtype=np.int64, count=len(bins))
    sample_off = np.concatenate([[0], np.cumsum(per_row)])
    row_off = np.concatenate([[0], np.cumsum(sample_len)])[sample_off]
    trained = np.concatenate([[0], np.cumsum(packed_labels != IGNORE_INDEX)])
    packed = datasets.Dataset(pa.table({
        "input_ids": _list_column(row_off, packed_ids, ids_col.type.value_type),
        "labels": _list_column(row_off, packed_labels, labels_col.type.value_type),
        "position_ids": _list_column(row_off, within, pa.int64()),
        "seq_lens": _list_column(sample_off, sample_len, pa.int64()),
        "num_tokens": pa.array(np.diff(row_off), pa.int64()),
        "num_trained": pa.array(trained[row_off[1:]] - trained[row_off[:-1]], pa.int64()),
    }))
    tokens = int(lengths.sum())
    report = {
        "samples": len(lengths),
        "rows": len(bins),
        "efficiency": tokens / (len(bins) * capacity) if bins else 0.0,
        "efficiency_unpacked": tokens / (len(lengths) * capacity) if len(lengths) else 0.0,
    }
    return packed, report
