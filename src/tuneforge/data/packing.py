"""Best-fit-decreasing packing of tokenized samples into rows of at most `capacity` tokens.

Samples stay whole (over-long ones were truncated or dropped before). Each packed row carries
`position_ids` restarting at 0 for every sample, from which attention keeps samples apart
(transformers builds a block-diagonal causal mask from them for SDPA/eager, and uses them as
sequence boundaries for flash-attention). The first token of every sample is never a target,
exactly as in unpacked training where position 0 has no predecessor.
"""

from __future__ import annotations

import bisect

import datasets

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


def pack_dataset(ds: datasets.Dataset, capacity: int) -> tuple[datasets.Dataset, dict]:
    """Pack a tokenized dataset (input_ids, labels) into rows with position_ids and seq_lens."""
    cols = ds.select_columns(["input_ids", "labels"])[:]  # plain lists: one Arrow read, not one per row
    ids_col, labels_col = cols["input_ids"], cols["labels"]
    lengths = [len(x) for x in ids_col]
    bins = best_fit_decreasing(lengths, capacity)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "num_tokens": [], "num_trained": []}
    for members in bins:
        ids, labels, pos, lens = [], [], [], []
        for i in members:
            ids.extend(ids_col[i])
            labels.extend([IGNORE_INDEX, *labels_col[i][1:]])
            pos.extend(range(lengths[i]))
            lens.append(lengths[i])
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
        rows["seq_lens"].append(lens)
        rows["num_tokens"].append(len(ids))
        rows["num_trained"].append(sum(1 for x in labels if x != IGNORE_INDEX))
    packed = datasets.Dataset.from_dict(rows)
    tokens = sum(lengths)
    report = {
        "samples": len(lengths),
        "rows": len(bins),
        "efficiency": tokens / (len(bins) * capacity) if bins else 0.0,
        "efficiency_unpacked": tokens / (len(lengths) * capacity) if lengths else 0.0,
    }
    return packed, report
