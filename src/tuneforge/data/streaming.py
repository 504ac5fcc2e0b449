"""The data stage for raw-text (completion) corpora that need not fit in memory: `data.streaming: true`.

Each training source is read with `datasets` streaming and processed in chunks of `data.stream_chunk_rows`
rows: quality filters, exact deduplication (one 64-bit hash per kept row is all that is remembered),
decontamination against `data.eval` and benchmark files, tokenization, and packing (best-fit decreasing
within each chunk). Rows are written to an Arrow file as they are produced (`Dataset.from_generator`), so
memory stays bounded by one chunk plus the hashes and one length per row. What needs the whole corpus
at once (near-duplicate removal, `eval_fraction` splits, per-source `samples`) is refused by the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import xxhash

from tuneforge.config.schema import DatasetSource, RunConfig
from tuneforge.data import invalid as invalid_rows
from tuneforge.data.dedup import NgramIndex, benchmark_texts, normalize_text
from tuneforge.data.fields import RowError, to_canonical
from tuneforge.data.formats import DataFormatError, csv_features
from tuneforge.data.locate import RowLocator
from tuneforge.data.packing import pack_dataset
from tuneforge.data.quality import failed_rule

STREAM_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def stream_texts(src: DatasetSource) -> Iterator[tuple[RowLocator, int, dict]]:
    """(where the file's rows are, the row's 0-based index in its file, {"text": the row's text value}) of every
    row of a completion-format source, streamed. A row without the field has no "text"."""
    if src.path is None:
        raise DataFormatError(
            "data.streaming reads files: a `synthetic` source cannot be streamed; set data.streaming=false"
        )
    if src.format not in ("auto", "completion"):
        raise DataFormatError(
            f"{src.path}: data.streaming supports the completion format (a `text` field) only, "
            f"not format {src.format!r}; set data.streaming=false for it"
        )
    path = Path(src.path).expanduser()
    if not path.exists():
        raise DataFormatError(f"{path}: data file not found (data source `path`)")
    files = sorted(p for p in path.rglob("*") if p.suffix in STREAM_BUILDERS) if path.is_dir() else [path]
    kinds = {STREAM_BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise DataFormatError(
            f"{path}: data.streaming reads .jsonl/.json/.csv/.parquet/.txt files, one kind per "
            f"source; found {sorted(p.suffix for p in files) or 'none'}"
        )
    column = src.columns.get("text", "text")
    n = 0
    for f in files:
        builder = next(iter(kinds))
        options = {"features": csv_features([f]), "na_filter": False} if builder == "csv" else {}  # text, as read whole
        stream = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True, **options)
        locate = RowLocator(str(f), [f])
        for i, row in enumerate(stream):
            if src.max_rows is not None and n >= src.max_rows:
                return
            n += 1
            yield locate, i, ({"text": row[column]} if column in row else {"_has": sorted(row)})


def _chunks(cfg: RunConfig) -> Iterator[tuple[int, list[tuple[RowLocator, int, dict]]]]:
    for k, src in enumerate(cfg.data.train):
        buf: list = []
        for item in stream_texts(src):
            buf.append(item)
            if len(buf) == cfg.data.stream_chunk_rows:
                yield k, buf
                buf = []
        if buf:
            yield k, buf


class StreamState:
    """What is remembered across chunks: hashes of kept rows, lengths, and the report's counters."""

    def __init__(self, cfg: RunConfig, eval_texts: list[str]):
        self.cfg = cfg
        refs = (eval_texts if cfg.data.decontaminate.against_eval else []) + benchmark_texts(
            cfg.data.decontaminate.files
        )
        self.index = (
            NgramIndex(refs, cfg.data.decontaminate.ngram, cfg.data.decontaminate.shared_ngram_fraction)
            if refs
            else None
        )
        self.reference_texts = len(refs)
        self.seen: set[int] = set()
        self.lengths: list[np.ndarray] = []
        self.sources = [
            {
                "source": s.path,
                "format": "completion",
                "rows_read": 0,
                "rows_valid": 0,
                "rows_invalid": 0,
                "rows_trained": 0,
            }
            for s in cfg.data.train
        ]
        self.invalid = invalid_rows.empty()
        self.quality: dict = {}
        self.exact_removed = self.contaminated = 0
        self.contaminated_examples: list[str] = []
        self.tok = {
            "rows_in": 0,
            "rows": 0,
            "tokens": 0,
            "trained_tokens": 0,
            "truncated_rows": 0,
            "dropped_overlong_rows": 0,
            "dropped_short_or_untrained_rows": 0,
        }
        self.packed_rows = 0


def _valid(state: StreamState, k: int, chunk: list) -> list[str]:
    """The texts of the chunk's valid rows (the same type checks as the in-memory path, fields.py)."""
    texts = []
    names = dict(state.cfg.data.train[k].columns)
    for locate, i, row in chunk:
        try:
            if "_has" in row:
                raise RowError(
                    f"missing field `{names.get('text', 'text')}`",
                    f" (the row has {row['_has']}): "
                    "streaming reads raw text; map your field with columns: {text: YOUR_FIELD}",
                )
            texts.append(to_canonical(row, "completion", names)["text"])
            continue
        except RowError as e:
            error = e
        if not state.cfg.data.skip_invalid:
            raise DataFormatError(f"{locate(i)}: {error}; {invalid_rows.SKIP_HINT}")
        invalid_rows.add(state.invalid, error.reason, f"{locate(i)}: {error}")
        state.sources[k]["rows_invalid"] += 1
    return texts


def _check_source(state: StreamState, k: int) -> None:
    """Stop when more than data.max_invalid_fraction of source k's rows were invalid."""
    source = state.sources[k]
    too_many = invalid_rows.too_many(
        source["source"],
        source["rows_invalid"],
        source["rows_read"],
        state.invalid["examples"],
        state.cfg.data.max_invalid_fraction,
    )
    if too_many:
        raise DataFormatError(too_many)


def _filter(state: StreamState, texts: list[str]) -> list[str]:
    """Quality rules, exact duplicates (normalised text, against every earlier chunk) and contamination."""
    d = state.cfg.data
    kept = []
    for text in texts:
        rule = failed_rule("", text, None, d.quality)
        if rule:
            entry = state.quality.setdefault(rule, {"removed": 0, "examples": []})
            entry["removed"] += 1
            if len(entry["examples"]) < 3:
                entry["examples"].append({"response": text[:120]})
            continue
        if d.dedup.exact:
            h = xxhash.xxh64_intdigest(normalize_text(text).encode("utf-8", "surrogatepass"))
            if h in state.seen:
                state.exact_removed += 1
                continue
            state.seen.add(h)
        if state.index is not None and state.index.hit(text):
            state.contaminated += 1
            if len(state.contaminated_examples) < 3:
                state.contaminated_examples.append(text[:120])
            continue
        kept.append(text)
    return kept


def _tokenized(state: StreamState, tok, texts: list[str]) -> list[list[int]]:
    d = state.cfg.data
    eos = tok.eos_token_id
    out: list[list[int]] = []
    if not texts:
        return out
    for ids in tok(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        state.tok["rows_in"] += 1
        if len(ids) > d.max_seq_len:
            if d.overlong == "drop":
                state.tok["dropped_overlong_rows"] += 1
                continue
            state.tok["truncated_rows"] += 1
            ids = ids[: d.max_seq_len]
        if len(ids) < max(2, d.quality.min_tokens):
            state.tok["dropped_short_or_untrained_rows"] += 1
            continue
        out.append(ids)
    return out


def _rows(state: StreamState, samples: list[list[int]]) -> Iterator[dict]:
    """Training rows of one chunk: the samples themselves, or packed (best-fit decreasing within the chunk)."""
    d = state.cfg.data
    if not d.packing:
        for ids in samples:
            yield {"input_ids": ids, "labels": ids, "num_tokens": len(ids), "num_trained": len(ids) - 1}
        return
    if not samples:
        return
    # the packing rules (whole samples, labels cut at sample starts, positions restarting) are pack_dataset's own
    packed, _ = pack_dataset(datasets.Dataset.from_dict({"input_ids": samples, "labels": samples}), d.max_seq_len)
    state.packed_rows += len(packed)
    cols = packed[:]
    for k in range(len(packed)):
        yield {name: cols[name][k] for name in cols}


def generate_rows(cfg: RunConfig, tok, state: StreamState) -> Iterator[dict]:
    """Every training row of the streamed corpus, chunk by chunk (the generator behind Dataset.from_generator)."""
    last = None
    for k, chunk in _chunks(cfg):
        if last is not None and k != last:
            _check_source(state, last)
        last = k
        state.sources[k]["rows_read"] += len(chunk)
        texts = _valid(state, k, chunk)
        state.sources[k]["rows_valid"] += len(texts)
        samples = _tokenized(state, tok, _filter(state, texts))
        state.sources[k]["rows_trained"] += len(samples)
        lengths = np.fromiter(map(len, samples), dtype=np.int32, count=len(samples))
        state.lengths.append(lengths)
        state.tok["rows"] += len(samples)
        state.tok["tokens"] += int(lengths.sum())
        state.tok["trained_tokens"] += int(lengths.sum()) - len(samples)
        yield from _rows(state, samples)
    if last is not None:
        _check_source(state, last)


def prepare_streamed(
    cfg: RunConfig, tok, eval_texts: list[str], work_dir: Path
) -> tuple[datasets.Dataset, dict, dict, list[int]]:
    """(train dataset written under work_dir, train report, the rest of the report, sample lengths)."""
    state = StreamState(cfg, eval_texts)
    features = {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "num_tokens": datasets.Value("int64"),
        "num_trained": datasets.Value("int64"),
    }
    if cfg.data.packing:
        features.update(
            position_ids=datasets.Sequence(datasets.Value("int64")), seq_lens=datasets.Sequence(datasets.Value("int64"))
        )
    # a fresh cache directory per preparation: datasets must never hand back an older generation's rows
    try:
        ds = datasets.Dataset.from_generator(
            generate_rows,
            features=datasets.Features(features),
            gen_kwargs={"cfg": cfg, "tok": tok, "state": state},
            cache_dir=str(work_dir / "stream-cache"),
            keep_in_memory=False,
        )
    except datasets.exceptions.DatasetGenerationError as e:  # our own errors (bad rows, files) are the cause
        if isinstance(e.__cause__, (DataFormatError, ValueError)):
            raise e.__cause__ from None
        raise
    lengths = np.sort(np.concatenate(state.lengths)) if state.lengths else np.zeros(0, dtype=np.int32)
    n = len(lengths)
    train = {
        **state.tok,
        "length": {
            "min": int(lengths[0]) if n else 0,
            "median": int(lengths[n // 2]) if n else 0,
            "p95": int(lengths[int(0.95 * (n - 1))]) if n else 0,
            "max": int(lengths[-1]) if n else 0,
        },
        "streamed": True,
        "chunk_rows": cfg.data.stream_chunk_rows,
    }
    train["trained_fraction"] = train["trained_tokens"] / max(train["tokens"], 1)
    if cfg.data.packing:
        train["packing"] = {
            "samples": n,
            "rows": state.packed_rows,
            "efficiency": train["tokens"] / max(1, state.packed_rows * cfg.data.max_seq_len),
            "efficiency_unpacked": train["tokens"] / max(1, n * cfg.data.max_seq_len),
        }
    rest = {
        "sources": state.sources,
        "invalid": state.invalid,
        "rows_read": sum(s["rows_read"] for s in state.sources),
        "quality": state.quality,
        "dedup": {"exact_removed": state.exact_removed, "near_removed": 0, "kept": train["rows_in"]},
        "decontamination": {
            "removed": state.contaminated,
            "reference_texts": state.reference_texts,
            "examples": state.contaminated_examples,
        },
        "mixing": [s["rows_trained"] for s in state.sources],
    }
    return ds, train, rest, lengths.tolist()


def first_texts(cfg: RunConfig, n: int = 10_000) -> Iterator[str]:
    """The first n valid texts of the stream (to train a new model's tokenizer)."""
    count = 0
    for src in cfg.data.train:
        for _, _, row in stream_texts(src):
            value = row.get("text")
            if isinstance(value, str) and value.strip():
                yield value
                count += 1
                if count >= n:
                    return
