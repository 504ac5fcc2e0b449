"""Exact and near-duplicate removal (MinHash LSH), and decontamination against eval data.

- exact: rows whose normalised text (case, whitespace, punctuation folded) is identical; the first is kept.
- near:  rows whose word-shingle sets have Jaccard similarity >= threshold with an earlier kept row.
         Candidates come from MinHash LSH (signatures in `minhash.py`, band layout from datasketch's
         `MinHashLSH`); each candidate is confirmed on the exact Jaccard of the two shingle sets, so a
         row is never removed on an over-estimate (the MinHash estimate only pre-screens candidates).
- decontamination: training rows sharing a word n-gram with any eval/benchmark text (texts shorter than
         n words must match a training row's whole text).
"""

from __future__ import annotations

import math
import string
import uuid
from collections.abc import Iterable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuneforge.config.schema import DecontamConfig, DedupConfig
from tuneforge.data.minhash import band_keys, shingle_hashes, signatures
from tuneforge.data.quality import prompt_and_response

MINHASH_SEED = 1
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative) weights: bands tuned for recall
_PUNCT = string.punctuation.encode()


def normalize_text(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace: 'The  answer: 42.' -> 'the answer 42'."""
    # bytes.translate drops the punctuation bytes in C; ASCII bytes never occur inside a multi-byte UTF-8
    # character, and str.split() splits on exactly the characters the regex \s matches
    return " ".join(
        text.lower().encode("utf-8", "surrogatepass").translate(None, _PUNCT).decode("utf-8", "surrogatepass").split()
    )


def compared_text(messages: list[dict], text: str, fields: str) -> str:
    prompt, response = prompt_and_response(messages, text)
    return {"prompt": prompt, "response": response, "all": f"{prompt}\n{response}"}[fields]


def _texts(ds: datasets.Dataset, fields: str) -> list[str]:
    cols = ds.select_columns(["messages", "text"])[:]  # plain lists: one Arrow read, not one per row
    return [compared_text(m, t, fields) for m, t in zip(cols["messages"], cols["text"])]


def exact_duplicate_rows(normalized: list[str]) -> list[bool]:
    """True for every row whose normalised text was seen before."""
    seen: set[str] = set()
    dup = []
    for t in normalized:
        dup.append(t in seen)
        seen.add(t)
    return dup


PAIR_BUDGET = 4_000_000  # candidate pairs examined at once; more (huge LSH buckets) takes the row-by-row path
FEATURE_BATCH_ROWS = 10_000  # rows per map call when worker processes compute the dedup features


def near_duplicate_rows(normalized: list[str], cfg: DedupConfig, skip: list[bool] | None) -> list[bool]:
    """True for every row that is a near-duplicate of an earlier kept row (rows in `skip` are ignored)."""
    rows = [i for i in range(len(normalized)) if not (skip and skip[i])]
    if not rows:
        return [False] * len(normalized)
    hashes, offsets = shingle_hashes([normalized[i] for i in rows], cfg.shingle_words, MINHASH_SEED)
    sig = signatures(hashes, offsets, cfg.num_perm, MINHASH_SEED)
    near = _near_rows(sig, lambda k: hashes[offsets[k] : offsets[k + 1]], cfg)
    dup = [False] * len(normalized)
    for k in np.flatnonzero(near).tolist():
        dup[rows[k]] = True
    return dup


# datasketch's MinHashLSH band layout (bands, rows per band) for LSH_WEIGHTS, by (threshold, num_perm): its
# answers for common settings, checked against it by tests/data/test_dedup.py. Other settings ask datasketch
# itself, whose import (scipy) takes longer than finding the near-duplicates of 50k rows.
LSH_BANDS = {
    64: {
        0.5: (21, 3),
        0.55: (19, 3),
        0.6: (16, 4),
        0.65: (16, 4),
        0.7: (12, 5),
        0.75: (12, 5),
        0.8: (10, 6),
        0.85: (8, 8),
        0.9: (6, 10),
        0.95: (4, 16),
    },
    128: {
        0.5: (26, 3),
        0.55: (32, 4),
        0.6: (24, 4),
        0.65: (25, 5),
        0.7: (21, 6),
        0.75: (18, 7),
        0.8: (16, 8),
        0.85: (12, 10),
        0.9: (9, 14),
        0.95: (6, 21),
    },
    256: {
        0.5: (53, 4),
        0.55: (51, 5),
        0.6: (41, 5),
        0.65: (42, 6),
        0.7: (36, 7),
        0.75: (30, 8),
        0.8: (25, 10),
        0.85: (19, 13),
        0.9: (15, 17),
        0.95: (9, 28),
    },
}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of datasketch's `MinHashLSH(threshold, num_perm, weights=LSH_WEIGHTS)`."""
    known = LSH_BANDS.get(num_perm, {}).get(threshold)
    if known:
        return known
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def _near_rows(sig: np.ndarray, shingles_of, cfg: DedupConfig) -> np.ndarray:
    """Which rows (in order) are near-duplicates of an earlier kept row, from their MinHash signatures and
    `shingles_of(k)`, the shingle hashes of row k."""
    bands, rows_per_band = lsh_bands(cfg.threshold, cfg.num_perm)
    keys = band_keys(sig, bands, rows_per_band)
    # rows alone in their bucket in every band can be no one's duplicate: only the others are visited
    groups = np.empty(keys.shape, dtype=np.int64)
    shared = np.zeros(len(sig), dtype=bool)
    pairs_per_band = 0
    for b in range(bands):
        _, groups[:, b], counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        shared |= counts[groups[:, b]] > 1
        pairs_per_band += int((counts * (counts - 1) // 2).sum())
    # pre-screen on the MinHash estimate (5 standard deviations below the threshold), then confirm exactly
    floor = cfg.threshold - 5 * math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)
    unique_shingles: dict[int, np.ndarray] = {}

    def shingle_set(k: int) -> np.ndarray:
        if k not in unique_shingles:
            unique_shingles[k] = np.unique(shingles_of(k))
        return unique_shingles[k]

    def jaccard(a: int, c: int) -> float:
        sa, sc = shingle_set(a), shingle_set(c)
        inter = np.intersect1d(sa, sc, assume_unique=True).size
        return inter / (sa.size + sc.size - inter)

    if pairs_per_band <= PAIR_BUDGET:
        return _near_by_pairs(groups, sig, floor, cfg.threshold, jaccard)
    return _near_row_by_row(groups, shared, sig, floor, cfg.threshold, jaccard)


def _near_row_by_row(
    groups: np.ndarray, shared: np.ndarray, sig: np.ndarray, floor: float, threshold: float, jaccard
) -> np.ndarray:
    """Rows in order: a row is a near-duplicate when an earlier kept row shares one of its LSH buckets, has a
    MinHash estimate >= floor and an exact Jaccard >= threshold; otherwise it joins its buckets as kept."""
    kept: list[dict[int, list[int]]] = [{} for _ in range(groups.shape[1])]
    near = np.zeros(len(groups), dtype=bool)
    for k in np.flatnonzero(shared).tolist():
        group = groups[k].tolist()
        cands = sorted({c for b, g in enumerate(group) for c in kept[b].get(g, ())})
        if cands:
            est = (sig[cands] == sig[k]).mean(axis=1)
            near[k] = any(jaccard(k, c) >= threshold for c, e in zip(cands, est) if e >= floor)
        if not near[k]:
            for b, g in enumerate(group):
                kept[b].setdefault(g, []).append(k)
    return near


def _near_by_pairs(groups: np.ndarray, sig: np.ndarray, floor: float, threshold: float, jaccard) -> np.ndarray:
    """`_near_row_by_row`'s answer, from all bucket-sharing pairs (c < k) at once: which pairs pass the
    estimate does not depend on which rows are kept, so they are found with numpy; then each row, in order,
    is a near-duplicate if one of its passing partners was kept and has an exact Jaccard >= threshold."""
    n = len(groups)
    codes = []
    for b in range(groups.shape[1]):
        order = np.lexsort((np.arange(n), groups[:, b]))  # by bucket, then row
        g = groups[order, b]
        for d in range(1, n):  # the pairs d apart in bucket order
            same = g[d:] == g[:-d]
            if not same.any():
                break
            codes.append(order[:-d][same] * n + order[d:][same])  # c * n + k, with c < k
    if not codes:
        return np.zeros(n, dtype=bool)
    pairs = np.unique(np.concatenate(codes))
    c_rows, k_rows = pairs // n, pairs % n
    step = 1 << 16  # pairs per comparison block (bounded memory)
    est = np.concatenate(
        [(sig[c_rows[i : i + step]] == sig[k_rows[i : i + step]]).mean(axis=1) for i in range(0, len(pairs), step)]
    )
    passing = est >= floor
    by_row: dict[int, list[int]] = {}  # row -> its earlier partners with a passing estimate
    for c, k in zip(c_rows[passing].tolist(), k_rows[passing].tolist()):
        by_row.setdefault(k, []).append(c)
    near = np.zeros(n, dtype=bool)
    for k in sorted(by_row):
        near[k] = any(not near[c] and jaccard(k, c) >= threshold for c in by_row[k])
    return near


def row_features(messages: list[list[dict]], texts: list[str], cfg: DedupConfig) -> pa.Table:
    """Per row: the normalised compared text and, for near-dedup, the MinHash signature and shingle hashes.
    Rows are independent (words hash alone, signatures are seeded), so any batching gives the same values."""
    normalized = [normalize_text(compared_text(m, t, cfg.fields)) for m, t in zip(messages, texts)]
    cols = {"normalized": pa.array(normalized, pa.large_string())}
    if cfg.near:
        hashes, offsets = shingle_hashes(normalized, cfg.shingle_words, MINHASH_SEED)
        sig = signatures(hashes, offsets, cfg.num_perm, MINHASH_SEED)
        cols["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.uint32()), cfg.num_perm)
        cols["shingles"] = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(hashes, pa.uint64()))
    return pa.table(cols)


def _row_features_batch(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    return row_features(batch.column("messages").to_pylist(), batch.column("text").to_pylist(), cfg)


def features_in_workers(ds: datasets.Dataset, fn, num_proc: int, desc: str, **fn_kwargs) -> pa.Table:
    """`fn` (a batch as an Arrow table -> a table of new columns) over every row in `num_proc` worker processes."""
    return (
        ds.select_columns([c for c in ("messages", "text", "score") if c in ds.column_names])
        .with_format("arrow")
        .map(
            fn,
            batched=True,
            batch_size=min(FEATURE_BATCH_ROWS, -(-len(ds) // num_proc)),
            num_proc=num_proc,
            remove_columns=[c for c in ("messages", "text", "score") if c in ds.column_names],
            fn_kwargs=fn_kwargs,
            desc=desc,
            new_fingerprint=uuid.uuid4().hex,
        )
        .data.table
    )  # tuneforge caches the stage itself


def _decide(features: pa.Table, cfg: DedupConfig, rows: list[int] | None) -> tuple[list[bool], list[bool]]:
    """(exact, near) flags, from `row_features`, of the rows at `rows` of `features` (None: all, in order)."""
    rows = list(range(features.num_rows)) if rows is None else rows
    n = len(rows)
    exact = [False] * n
    if cfg.exact:  # the first row of each distinct normalised text is kept
        codes = pc.dictionary_encode(features.column("normalized").take(pa.array(rows, pa.int64())).combine_chunks())
        first = np.unique(codes.indices.to_numpy(zero_copy_only=False), return_index=True)[1]
        is_dup = np.ones(n, dtype=bool)
        is_dup[first] = False
        exact = is_dup.tolist()
    near = [False] * n
    if cfg.near:
        left = [k for k in range(n) if not exact[k]]  # positions in `rows`
        at = np.asarray([rows[k] for k in left], dtype=np.int64)  # positions in `features`
        sig = features.column("signature").combine_chunks().flatten().to_numpy().reshape(-1, cfg.num_perm)[at]
        shingles = features.column("shingles")
        hashes = pc.list_flatten(shingles).to_numpy(zero_copy_only=False)
        offsets = np.zeros(features.num_rows + 1, dtype=np.int64)
        np.cumsum(pc.list_value_length(shingles).to_numpy(zero_copy_only=False), out=offsets[1:])
        found = _near_rows(sig, lambda k: hashes[offsets[at[k]] : offsets[at[k] + 1]], cfg)
        for k in np.flatnonzero(found).tolist():
            near[left[k]] = True
    return exact, near


def deduplicate(
    ds: datasets.Dataset,
    cfg: DedupConfig,
    num_proc: int | None = None,
    features: pa.Table | None = None,
    rows: list[int] | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Drop exact and near duplicates (the first occurrence is kept). With num_proc > 1 worker processes
    compute the per-row part (normalising, hashing, signatures), or `features` holds it already: the
    `row_features` of ds's rows (at positions `rows` of the table when given). The decisions are the same."""
    if features is None and num_proc and num_proc > 1 and (cfg.exact or cfg.near) and len(ds) >= num_proc * 1000:
        features = features_in_workers(ds, _row_features_batch, num_proc, "dedup features", cfg=cfg)
    if features is not None:
        exact, near = _decide(features, cfg, rows)
    else:
        normalized = [normalize_text(t) for t in _texts(ds, cfg.fields)] if (cfg.exact or cfg.near) else [""] * len(ds)
        exact = exact_duplicate_rows(normalized) if cfg.exact else [False] * len(ds)
        near = near_duplicate_rows(normalized, cfg, skip=exact) if cfg.near else [False] * len(ds)
    keep = [i for i in range(len(ds)) if not (exact[i] or near[i])]
    report = {"exact_removed": sum(exact), "near_removed": sum(near), "kept": len(keep)}
    return (ds.select(keep, new_fingerprint=uuid.uuid4().hex) if len(keep) < len(ds) else ds), report


# ---------------------------------------------------------------------------- decontamination
def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def benchmark_texts(paths: list[str]) -> list[str]:
    """Every string field of every row of the benchmark files."""
    from tuneforge.config.schema import DatasetSource
    from tuneforge.data.formats import read_source

    out: list[str] = []
    for p in paths:
        ds, _, _ = read_source(DatasetSource(path=p))
        for row in ds:
            out.extend(s for s in _strings(row) if s.strip())
    return out


SHARED_MIN_TEXTS = 5  # an n-gram in fewer reference texts than this is content, however small the set


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


class NgramIndex:
    """Word n-grams of reference texts; short references (< n words) are kept whole.

    An n-gram found in more than `shared_fraction` of the reference texts (and in at least SHARED_MIN_TEXTS
    of them) is a shared template, such as an instruction every row repeats, not content. The words such
    n-grams cover are cut out of every text, references and candidates alike, and only n-grams of the
    content between them count: otherwise every row with the same instruction would look contaminated,
    and so would a row whose text merely starts with the same word as one reference's."""

    def __init__(self, texts: Iterable[str], n: int, shared_fraction: float = 1.0):
        from collections import Counter

        self.n = n
        self.whole: set[str] = set()
        long_refs: list[list[str]] = []
        counts: Counter[tuple[str, ...]] = Counter()
        for t in texts:
            words = normalize_text(t).split()
            if len(words) < n:
                if words:
                    self.whole.add(" ".join(words))
            else:
                long_refs.append(words)
                counts.update(set(_ngrams(words, n)))
        limit = max(SHARED_MIN_TEXTS - 1, shared_fraction * (len(long_refs) + len(self.whole)))
        self.template = {g for g, c in counts.items() if c > limit}
        self.shared = len(self.template)
        self.grams: set[tuple[str, ...]] = set()
        for words in long_refs:
            self.grams.update(self._content_ngrams(words))

    def _content_ngrams(self, words: list[str]):
        if not self.template:
            yield from _ngrams(words, self.n)
            return
        covered = [False] * len(words)
        for i, g in enumerate(_ngrams(words, self.n)):
            if g in self.template:
                covered[i : i + self.n] = [True] * self.n
        segment: list[str] = []
        for w, c in zip([*words, ""], [*covered, True]):
            if not c:
                segment.append(w)
                continue
            if len(segment) >= self.n:
                yield from _ngrams(segment, self.n)
            segment = []

    def hit(self, text: str) -> bool:
        words = normalize_text(text).split()
        if " ".join(words) in self.whole:
            return True
        return any(g in self.grams for g in self._content_ngrams(words))


def decontaminate(
    ds: datasets.Dataset, eval_ds: datasets.Dataset | None, cfg: DecontamConfig
) -> tuple[datasets.Dataset, dict]:
    refs: list[str] = []
    if cfg.against_eval and eval_ds is not None:
        refs.extend(_texts(eval_ds, "all"))
    refs.extend(benchmark_texts(cfg.files))
    if not refs:
        return ds, {"removed": 0, "reference_texts": 0, "examples": []}
    index = NgramIndex(refs, cfg.ngram, cfg.shared_ngram_fraction)
    texts = _texts(ds, "all")
    hits = [index.hit(t) for t in texts]
    keep = [i for i, h in enumerate(hits) if not h]
    examples = [texts[i][:120] for i, h in enumerate(hits) if h][:3]
    report = {
        "removed": sum(hits),
        "reference_texts": len(refs),
        "shared_ngrams_ignored": index.shared,
        "examples": examples,
    }
    return (ds.select(keep) if len(keep) < len(ds) else ds), report
