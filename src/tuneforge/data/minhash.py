"""MinHash signatures of word-shingle sets for a whole corpus at once (numpy, no per-shingle Python).

- words are hashed once per distinct word (xxh64, after `pyarrow` splits and dictionary-encodes them);
- a shingle (k consecutive words; a row with fewer than k words is one shingle) hashes to the 64-bit
  mix of its word hashes, so "a b c" and "c b a" differ;
- signatures use one-permutation hashing (Li, Owen & Zhang, 2012): each shingle hash falls into one of
  `num_perm` bins, and a bin keeps its smallest value; empty bins are filled by optimal densification
  (Shrivastava, 2017), which copies a donor bin chosen by a fixed sequence of (bin, attempt) draws.
  For two sets A and B, every signature position agrees with probability Jaccard(A, B), as with
  `num_perm` independent permutations, at one hash per shingle instead of `num_perm`.

The LSH band layout (b bands of r rows) is datasketch's, chosen by `MinHashLSH` for the threshold.
Everything is seeded: the same texts give the same signatures in every process and on every machine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

U64 = np.uint64
_MAX_ATTEMPTS = 1 << 16


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection with full avalanche), in place."""
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    h ^= h >> U64(33)
    return h


def _word_starts(arr: pa.LargeStringArray) -> np.ndarray | None:
    """Byte offsets (into arr's data buffer) where the words of single-spaced texts start, plus the end of the
    last text: the offsets of a string array whose items are the words, each with the space that follows it.
    None when a text is empty or has a leading, trailing or double space (those take the general path)."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    if len(arr) == 0 or arr.null_count or np.any(offsets[1:] == offsets[:-1]):
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    begin, end = int(offsets[0]), int(offsets[-1])
    spaces = np.flatnonzero(data[begin:end] == 0x20) + begin
    if np.any(data[offsets[:-1]] == 0x20) or np.any(data[offsets[1:] - 1] == 0x20) or np.any(np.diff(spaces) == 1):
        return None
    is_start = np.zeros(end - begin + 1, dtype=bool)
    is_start[offsets[:-1] - begin] = True
    is_start[spaces + 1 - begin] = True
    is_start[-1] = True
    return np.flatnonzero(is_start) + begin


def word_hashes(normalized: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word, flat; word offsets per row, n+1) of texts already normalised (single spaces)."""
    import xxhash

    arr = pa.array(normalized, pa.large_string())
    starts = _word_starts(arr)
    if starts is None:  # an empty text, or spaces not single: split on every space ("" gives [""]; fixed below)
        words = pc.split_pattern(arr, " ")
        counts = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(words)
    else:  # the words as slices of the texts' own bytes (each but a text's last one ending with its space)
        flat = pa.LargeStringArray.from_buffers(len(starts) - 1, pa.py_buffer(starts), arr.buffers()[2])
        text_offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
        counts = np.diff(np.searchsorted(starts, text_offsets))
    empty = np.fromiter((not t for t in normalized), dtype=bool, count=len(normalized))
    enc = pc.dictionary_encode(flat)
    vocab = enc.dictionary.to_pylist()
    vocab_hashes = np.fromiter(
        (xxhash.xxh64_intdigest(w.removesuffix(" ").encode("utf-8", "surrogatepass"), seed) for w in vocab),
        dtype=U64,
        count=len(vocab),
    )
    hashes = vocab_hashes[enc.indices.to_numpy(zero_copy_only=False)]
    if empty.any():  # drop the "" word of empty rows
        keep = np.repeat(~empty, counts)
        hashes, counts = hashes[keep], np.where(empty, 0, counts)
    offsets = np.zeros(len(normalized) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return hashes, offsets


def shingle_hashes(normalized: list[str], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word k-gram, flat; shingle offsets per row). A row of fewer than k words
    (even none) is one shingle, so every row has at least one."""
    words, wo = word_hashes(normalized, seed)
    lens = np.diff(wo)
    n_sh = np.where(lens >= k, lens - k + 1, 1)
    so = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=so[1:])
    mult = np.random.default_rng(seed).integers(0, 2**63, size=k, dtype=np.uint64) * U64(2) + U64(1)  # odd
    out = np.empty(int(so[-1]), dtype=U64)
    short = lens < k
    # rows of k words or more: every window of k consecutive words, summed over the whole corpus at once
    n_win = max(len(words) - k + 1, 0)
    acc = np.zeros(n_win, dtype=U64)
    for j in range(k):
        acc += words[j : j + n_win] * mult[j]
    window_end = np.arange(n_win, dtype=np.int64) + k
    inside = window_end <= np.repeat(wo[1:], lens)[:n_win]  # the window ends inside its first word's row
    out[~np.repeat(short, n_sh)] = acc[inside]
    # rows of fewer than k words (rare): one shingle of all their words
    rows = np.flatnonzero(short)
    short_acc = np.zeros(len(rows), dtype=U64)
    for j in range(k - 1):
        has = lens[rows] > j
        short_acc[has] += words[wo[rows[has]] + j] * mult[j]
    out[so[rows]] = short_acc
    return _fmix64(out), so


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(rows, num_perm) uint32 densified one-permutation MinHash signatures of the rows' shingle hashes."""
    n = len(offsets) - 1
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    slot = row * num_perm + (((hashes >> U64(32)) * U64(num_perm)) >> U64(32)).astype(np.int64)
    sig = np.full(n * num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    np.minimum.at(sig, slot, (hashes & U64(0xFFFFFFFF)).astype(np.uint32))
    filled = np.zeros(n * num_perm, dtype=bool)
    filled[slot] = True
    sig, filled = sig.reshape(n, num_perm), filled.reshape(n, num_perm)
    rows, bins = np.nonzero(~filled)
    donors = np.random.default_rng(seed)
    for _ in range(_MAX_ATTEMPTS):  # optimal densification: the donor of (bin, attempt) is the same for every row
        if rows.size == 0:
            break
        donor = donors.integers(0, num_perm, size=num_perm)[bins]
        ok = filled[rows, donor]
        sig[rows[ok], bins[ok]] = sig[rows[ok], donor[ok]]  # donors are originally filled bins: values unchanged
        rows, bins = rows[~ok], bins[~ok]
    if rows.size:  # practically unreachable (a row with one filled bin needs ~num_perm*ln(num_perm) attempts)
        sig[rows, bins] = sig[rows, np.argmax(filled[rows], axis=1)]
    return sig


def band_keys(sig: np.ndarray, bands: int, rows_per_band: int) -> np.ndarray:
    """(rows, bands) uint64: one hash per LSH band of `rows_per_band` consecutive signature values."""
    mult = np.random.default_rng(0).integers(0, 2**63, size=rows_per_band, dtype=np.uint64) * U64(2) + U64(1)
    keys = np.empty((len(sig), bands), dtype=U64)
    for b in range(bands):
        block = sig[:, b * rows_per_band : (b + 1) * rows_per_band].astype(U64)
        keys[:, b] = _fmix64((block * mult).sum(axis=1, dtype=U64) + U64(b))
    return keys
