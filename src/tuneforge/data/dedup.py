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
from collections.abc import Iterable

import datasets
import numpy as np

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
    return " ".join(text.lower().encode("utf-8", "surrogatepass").translate(None, _PUNCT)
                    .decode("utf-8", "surrogatepass").split())


def compared_text(messages: list[dict], text: str, fields: str) -> str:
    prompt, response = prompt_and_response(messages, text)
    return {"prompt": prompt, "response": response, "all": f"{prompt}\n{response}"}[fields]


def _texts(ds: datasets.Dataset, fields: str) -> list[str]:
    cols = ds.select_columns(["messages", "text"])[:]  # plain lists: one Arrow read, not one per row
    return [compared_text(m, t, fields) for m, t in zip(cols["messages"], cols["text"])]


def _exact(normalized: list[str]) -> list[bool]:
    seen: set[str] = set()
    dup = []
    for t in normalized:
        dup.append(t in seen)
        seen.add(t)
    return dup


def exact_duplicates(texts: list[str]) -> list[bool]:
    """True for every row whose normalised text was seen before."""
    return _exact([normalize_text(t) for t in texts])


def _near(normalized: list[str], cfg: DedupConfig, skip: list[bool] | None) -> list[bool]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
    rows = [i for i in range(len(normalized)) if not (skip and skip[i])]
    if not rows:
        return [False] * len(normalized)
    hashes, offsets = shingle_hashes([normalized[i] for i in rows], cfg.shingle_words, MINHASH_SEED)
    sig = signatures(hashes, offsets, cfg.num_perm, MINHASH_SEED)
    keys = band_keys(sig, lsh.b, lsh.r)
    # rows alone in their bucket in every band can be no one's duplicate: only the others are visited
    groups = np.empty(keys.shape, dtype=np.int64)
    shared = np.zeros(len(rows), dtype=bool)
    for b in range(lsh.b):
        _, groups[:, b], counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        shared |= counts[groups[:, b]] > 1
    # pre-screen on the MinHash estimate (5 standard deviations below the threshold), then confirm exactly
    floor = cfg.threshold - 5 * math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)
    kept: list[dict[int, list[int]]] = [{} for _ in range(lsh.b)]
    unique_shingles: dict[int, np.ndarray] = {}

    def shingle_set(k: int) -> np.ndarray:
        if k not in unique_shingles:
            unique_shingles[k] = np.unique(hashes[offsets[k]:offsets[k + 1]])
        return unique_shingles[k]

    def jaccard(a: int, c: int) -> float:
        sa, sc = shingle_set(a), shingle_set(c)
        inter = np.intersect1d(sa, sc, assume_unique=True).size
        return inter / (sa.size + sc.size - inter)

    near = np.zeros(len(rows), dtype=bool)
    for k in np.flatnonzero(shared).tolist():
        group = groups[k].tolist()
        cands = sorted({c for b, g in enumerate(group) for c in kept[b].get(g, ())})
        if cands:
            est = (sig[cands] == sig[k]).mean(axis=1)
            near[k] = any(jaccard(k, c) >= cfg.threshold for c, e in zip(cands, est) if e >= floor)
        if not near[k]:
            for b, g in enumerate(group):
                kept[b].setdefault(g, []).append(k)
    dup = [False] * len(normalized)
    for k in np.flatnonzero(near).tolist():
        dup[rows[k]] = True
    return dup


def near_duplicates(texts: list[str], cfg: DedupConfig, skip: list[bool] | None = None) -> list[bool]:
    """True for every row that is a near-duplicate of an earlier kept row (rows in `skip` are ignored)."""
    return _near([normalize_text(t) for t in texts], cfg, skip)


def deduplicate(ds: datasets.Dataset, cfg: DedupConfig) -> tuple[datasets.Dataset, dict]:
    normalized = [normalize_text(t) for t in _texts(ds, cfg.fields)] if (cfg.exact or cfg.near) else [""] * len(ds)
    exact = _exact(normalized) if cfg.exact else [False] * len(ds)
    near = _near(normalized, cfg, skip=exact) if cfg.near else [False] * len(ds)
    keep = [i for i in range(len(ds)) if not (exact[i] or near[i])]
    report = {"exact_removed": sum(exact), "near_removed": sum(near), "kept": len(keep)}
    return (ds.select(keep) if len(keep) < len(ds) else ds), report


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


class NgramIndex:
    """Word n-grams of reference texts; short references (< n words) are kept whole."""

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.whole: set[str] = set()
        for t in texts:
            words = normalize_text(t).split()
            if len(words) < n:
                if words:
                    self.whole.add(" ".join(words))
            else:
                self.grams.update(zip(*(words[i:] for i in range(n))))

    def hit(self, text: str) -> bool:
        words = normalize_text(text).split()
        if " ".join(words) in self.whole:
            return True
        return any(g in self.grams for g in zip(*(words[i:] for i in range(self.n))))


def decontaminate(ds: datasets.Dataset, eval_ds: datasets.Dataset | None, cfg: DecontamConfig) -> tuple[datasets.Dataset, dict]:
    refs: list[str] = []
    if cfg.against_eval and eval_ds is not None:
        refs.extend(_texts(eval_ds, "all"))
    refs.extend(benchmark_texts(cfg.files))
    if not refs:
        return ds, {"removed": 0, "reference_texts": 0, "examples": []}
    index = NgramIndex(refs, cfg.ngram)
    texts = _texts(ds, "all")
    hits = [index.hit(t) for t in texts]
    keep = [i for i, h in enumerate(hits) if not h]
    examples = [texts[i][:120] for i, h in enumerate(hits) if h][:3]
    report = {"removed": sum(hits), "reference_texts": len(refs), "examples": examples}
    return (ds.select(keep) if len(keep) < len(ds) else ds), report
