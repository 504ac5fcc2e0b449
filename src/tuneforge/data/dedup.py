"""Exact and near-duplicate removal (MinHash LSH via datasketch), and decontamination against eval data.

- exact: rows whose normalised text (case, whitespace, punctuation folded) is identical; the first is kept.
- near:  rows whose estimated Jaccard similarity of word-shingle sets is >= threshold with an earlier
         kept row (LSH candidates are confirmed with the MinHash estimate).
- decontamination: training rows sharing a word n-gram with any eval/benchmark text (texts shorter than
         n words must match a training row's whole text).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable

import datasets

from tuneforge.config.schema import DecontamConfig, DedupConfig
from tuneforge.data.quality import prompt_and_response

MINHASH_SEED = 1
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace: 'The  answer: 42.' -> 'the answer 42'."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


def compared_text(messages: list[dict], text: str, fields: str) -> str:
    prompt, response = prompt_and_response(messages, text)
    return {"prompt": prompt, "response": response, "all": f"{prompt}\n{response}"}[fields]


def _texts(ds: datasets.Dataset, fields: str) -> list[str]:
    cols = ds.select_columns(["messages", "text"])[:]  # plain lists: one Arrow read, not one per row
    return [compared_text(m, t, fields) for m, t in zip(cols["messages"], cols["text"])]


def shingles(words: list[str], k: int) -> set[bytes]:
    if len(words) <= k:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


def exact_duplicates(texts: list[str]) -> list[bool]:
    """True for every row whose normalised text was seen before."""
    seen: set[bytes] = set()
    dup = []
    for t in texts:
        key = hashlib.blake2b(normalize_text(t).encode(), digest_size=16).digest()
        dup.append(key in seen)
        seen.add(key)
    return dup


def near_duplicates(texts: list[str], cfg: DedupConfig, skip: list[bool] | None = None) -> list[bool]:
    """True for every row that is a near-duplicate of an earlier kept row."""
    import xxhash
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    sets = [shingles(normalize_text(t).split(), cfg.shingle_words) for t in texts]
    # xxh32 hashes shingles ~3x faster than datasketch's default sha1
    hashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=MINHASH_SEED, hashfunc=xxhash.xxh32_intdigest)
    # bands tuned for recall (LSH misses ~7% of pairs at Jaccard 0.9 with equal weights); the false
    # candidates this lets through are rejected by the MinHash estimate check below
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(0.05, 0.95))
    kept: dict[int, LeanMinHash] = {}
    dup = []
    for i, m in enumerate(hashes):
        if skip is not None and skip[i]:
            dup.append(False)
            continue
        lean = LeanMinHash(m)
        hit = any(lean.jaccard(kept[j]) >= cfg.threshold for j in lsh.query(lean))
        dup.append(hit)
        if not hit:
            lsh.insert(i, lean)
            kept[i] = lean
    return dup


def deduplicate(ds: datasets.Dataset, cfg: DedupConfig) -> tuple[datasets.Dataset, dict]:
    texts = _texts(ds, cfg.fields)
    exact = exact_duplicates(texts) if cfg.exact else [False] * len(texts)
    near = near_duplicates(texts, cfg, skip=exact) if cfg.near else [False] * len(texts)
    keep = [i for i in range(len(texts)) if not (exact[i] or near[i])]
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
