"""STAGE: read -> normalise -> quality filters -> dedup -> split -> decontaminate -> mix -> tokenize (+labels)
-> truncate/drop -> pack -> save + report.

Writes `<run>/data/`:
  train/, eval/        `datasets` on disk (load_from_disk): input_ids, labels, messages, text, num_tokens, num_trained
                       (preference data: prompt_ids, chosen_ids, rejected_ids; KTO: prompt_ids, completion_ids,
                       label; see pair_encode.py)
  tokenizer/           the tokenizer used (with its chat template); later stages load it from here
  data_report.json     the kind of data ("kind": sft | preference | kto, read with `prepared_kind`), rows read,
                       dropped per reason, duplicates, contamination, lengths, packing
  lengths.png          histogram of tokenized sample lengths
  fingerprint          hash of every input; an identical fingerprint means the cache is reused
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge import __version__
from tuneforge.config.schema import DedupConfig, QualityConfig, RunConfig
from tuneforge.data import invalid as invalid_rows
from tuneforge.data.dedup import decontaminate, deduplicate, features_in_workers, row_features
from tuneforge.data.encode import tokenize_split
from tuneforge.data.formats import column
from tuneforge.data.histogram import start_length_histogram
from tuneforge.data.masks import end_of_turn_ids
from tuneforge.data.packing import pack_dataset
from tuneforge.data.pair_encode import tokenize_pairs
from tuneforge.data.preference import filter_view, prepared_kind, rows_kept, run_kind
from tuneforge.data.quality import apply_quality_filters, failed_rules
from tuneforge.data.report_summary import summary
from tuneforge.data.sources import read_normalized, row_locator, template_invalid, where_from
from tuneforge.data.templates import resolve_template
from tuneforge.data.tokenizer import build_tokenizer
from tuneforge.gguf_path import is_gguf, resolve_gguf_path

# bumped whenever the same inputs give other prepared rows (2: BOS written by a template split off before
# tokenizing, see data/masks.py; no newlines after Alpaca's last EOS; 3: fields type-checked, never stringified,
# CSV read as text, a source_row column; 4: tokens trained for their own text only (Phi-3's role token), EOS
# after every reply of a template without end-of-turn markers, tool calls in `messages`), so older caches are rebuilt
DATA_FORMAT = 4


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    tokenizer: PreTrainedTokenizerBase
    report: dict
    reused: bool


def data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


# ---------------------------------------------------------------------------- fingerprint
def _hash_path(h: hashlib._Hash, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            _hash_path(h, p)
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]


def fingerprint_parts(cfg: RunConfig) -> dict[str, str]:
    """A hash per input that changes the prepared data, so a rebuild can say which one changed."""
    tok_source = cfg.model.tokenizer or cfg.model.name_or_path
    if is_gguf(tok_source):  # a file inside an installed package: hash the file itself
        tok_source = str(resolve_gguf_path(tok_source))
    parts = {
        "data config": _digest([cfg.data.model_dump(mode="json")]),
        "tokenizer": _digest(
            [
                tok_source,
                cfg.model.revision,
                cfg.model.init.tokenizer_vocab_size if cfg.model.init and not cfg.model.tokenizer else None,
                *([Path(tok_source)] if tok_source and Path(tok_source).exists() else []),
            ]
        ),
        "tuneforge version": __version__,
        "prepared-data format": str(DATA_FORMAT),
    }
    if cfg.data.chat_template not in ("auto", "alpaca", "chatml") and Path(cfg.data.chat_template).exists():
        parts["chat template file"] = _digest([Path(cfg.data.chat_template)])
    sources = [*cfg.data.train, *([cfg.data.eval] if cfg.data.eval else [])]
    files = [
        *(s.path for s in sources if s.path),
        *(s.synthetic.text for s in sources if s.synthetic and s.synthetic.text),
        *cfg.data.decontaminate.files,
    ]
    for f in files:
        parts[f"file {f}"] = _digest([Path(f)]) if Path(f).exists() else "missing"
    return parts


def fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that changes the prepared data: data config, sources' bytes, tokenizer, version."""
    return _digest([fingerprint_parts(cfg)])


def _what_changed(old: dict, new: dict) -> str:
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(changed) if changed else "unknown"


# ---------------------------------------------------------------------------- stages
class StageClock:
    """Seconds per stage (wall clock), for the report: `with clock("dedup"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name, self._start = "", 0.0

    def __call__(self, name: str) -> StageClock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = round(self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start, 3)


def _load_all(cfg: RunConfig, log, clock: StageClock) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """Read and normalise every source, then filter, deduplicate, split and decontaminate."""
    d = cfg.data
    parts, sources, invalid, locators = [], [], invalid_rows.empty(), {}

    def read(src, source_id: int):
        rows, source = read_normalized(src, d, locators, source_id)
        sources.append(source)
        invalid_rows.merge(invalid, source.pop("invalid"))
        return rows.add_column("source_id", [source_id] * len(rows))

    with clock("read"):
        for k, src in enumerate(d.train):
            parts.append(read(src, k))
        train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    kind = run_kind(sources, d.packing)
    report: dict = {
        "kind": kind,
        "sources": sources,
        "invalid": invalid,
        "rows_read": len(train),
        "_locators": locators,
    }
    rows, train = train, filter_view(train, kind)  # pairs are judged on prompt + chosen (KTO: + completion)
    with clock("quality"):
        reasons = features = None
        if d.num_proc > 1 and (d.dedup.exact or d.dedup.near) and len(train) >= d.num_proc * 1000:
            # one pass of the worker processes over the rows: the quality verdicts and the dedup hashes together
            features = features_in_workers(
                train, _judge_and_hash, d.num_proc, "quality filters, dedup hashes", q=d.quality, dedup=d.dedup
            )
            reasons = features.column("_drop").to_pylist()
        train, report["quality"] = apply_quality_filters(
            train, d.quality, d.num_proc if d.num_proc > 1 else None, reasons, locate=row_locator(train, locators)
        )
    with clock("dedup"):
        kept = [i for i, r in enumerate(reasons) if not r] if features is not None else None
        train, report["dedup"] = deduplicate(train, d.dedup, d.num_proc, features, kept)
    train = rows_kept(rows, train)
    eval_ = None
    with clock("read"):
        if d.eval is not None:
            eval_ = read(d.eval, -1)
            run_kind(sources)  # the eval source is of the same kind
        elif d.eval_fraction > 0 and len(train) > 1:
            split = train.train_test_split(test_size=d.eval_fraction, seed=d.seed)
            train, eval_ = split["train"], split["test"]
    with clock("decontaminate"):
        # pairs are compared on the prompt and both completions
        view, report["decontamination"] = decontaminate(
            filter_view(train, kind, both=True),
            filter_view(eval_, kind, both=True) if eval_ is not None else None,
            d.decontaminate,
        )
        train = rows_kept(train, view)
    train, report["mixing"] = mix_sources(train, [s.samples for s in d.train], d.seed)
    for k, n in enumerate(report["mixing"]):
        sources[k]["rows_trained"] = n
    if len(train) == 0:
        raise ValueError(f"data: no training rows left after filtering: {json.dumps(report, default=str)[:2000]}")
    return train, eval_, report


def _judge_and_hash(batch: pa.Table, q: QualityConfig, dedup: DedupConfig) -> pa.Table:
    """Map function: each row's first failed quality rule ('' if none) and its dedup features."""
    messages, texts = batch.column("messages").to_pylist(), batch.column("text").to_pylist()
    scores = batch.column("score").to_pylist() if "score" in batch.column_names else None
    verdicts = pa.array(failed_rules(messages, texts, scores, q), pa.string())
    return row_features(messages, texts, dedup).append_column("_drop", verdicts)


def mix_sources(ds: datasets.Dataset, samples: list[int | None], seed: int) -> tuple[datasets.Dataset, list[int]]:
    """Per source, keep all rows or exactly `samples` of them (seeded sample, repeats when upsampling)."""
    rng = np.random.default_rng(seed)
    by_source = np.asarray(column(ds, "source_id"))
    keep: list[int] = []
    counts = []
    for k, n in enumerate(samples):
        rows = np.flatnonzero(by_source == k)
        if n is not None and len(rows):
            repeats, rest = divmod(n, len(rows))
            rows = np.concatenate([np.tile(rows, repeats), rng.choice(rows, size=rest, replace=False)])
        keep.extend(rows.tolist())
        counts.append(len(rows))
    if all(n is None for n in samples):
        return ds, counts
    return ds.select(sorted(keep)), counts


def _corpus(ds: datasets.Dataset):
    replies = [c for c in ("chosen", "rejected", "completion") if c in ds.column_names]
    for row in ds:
        yield row["text"] or "\n".join([*(m["content"] for m in row["messages"]), *(row[c] for c in replies)])


def _template(tok, cfg: RunConfig) -> tuple[str, str]:
    template, template_name = resolve_template(tok, cfg.data.chat_template)
    if template_name != "tokenizer":
        tok.chat_template = template  # saved with the tokenizer, so generation uses the training template
    return template, template_name


def _streamed(cfg: RunConfig, clock: StageClock, tmp: Path):
    """The streaming path (data.streaming): the training corpus chunk by chunk, data.eval read whole."""
    from tuneforge.data.dedup import _texts
    from tuneforge.data.streaming import first_texts, prepare_streamed

    d = cfg.data
    eval_, locators = None, {}
    with clock("read"):
        if d.eval is not None:
            eval_, _ = read_normalized(d.eval, d, locators, -1)
            eval_ = eval_.add_column("source_id", [-1] * len(eval_))
    with clock("stream: filter, dedup, tokenize, pack"):
        tok = build_tokenizer(cfg.model, first_texts(cfg))
        template, template_name = _template(tok, cfg)
        train_tok, train_rep, report, lengths = prepare_streamed(cfg, tok, _texts(eval_, "all") if eval_ else [], tmp)
    with clock("tokenize"):
        eval_tok, eval_rep = (
            tokenize_split(eval_, tok, template, cfg.data, "eval", locate=where_from(locators))
            if eval_ is not None
            else (None, None)
        )
    return train_tok, eval_tok, tok, template, template_name, train_rep, eval_rep, report, lengths


def prepare(cfg: RunConfig, run_dir: str | Path, force: bool = False, log=print) -> PreparedData:
    """Run the data stage into `<run_dir>/data`, or reuse it when its fingerprint matches."""
    out = data_dir(run_dir)
    parts = fingerprint_parts(cfg)
    fp = _digest([parts])
    fp_file, parts_file = out / "fingerprint", out / "fingerprint.json"
    if not force and fp_file.exists() and fp_file.read_text().strip() == fp:
        log(f"data: reusing prepared data in {out} (fingerprint {fp}: inputs unchanged)")
        return load_prepared(run_dir, reused=True)
    if fp_file.exists():
        old = json.loads(parts_file.read_text()) if parts_file.exists() else {}
        log(f"data: preparing again, changed since the cached data: {_what_changed(old, parts)}")
    with _collector_skips_long_lived_objects():
        _build(cfg, out, fp, parts, log)
        return load_prepared(run_dir, reused=False)


@contextmanager
def _collector_skips_long_lived_objects():
    """Python's cyclic garbage collector leaves alone the objects alive when the stage starts (modules, the
    tokenizer: some 300k) while it runs: each of its full collections would walk them all again (0.6 s of
    tokenizing 50k rows), and forked worker processes would copy every memory page it touches. A caller's
    own frozen objects stay frozen."""
    caller_froze = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not caller_froze:
            gc.unfreeze()


def _build(cfg: RunConfig, out: Path, fp: str, parts: dict[str, str], log) -> None:
    """Prepare the data afresh into `out` (written to a sibling directory, then renamed)."""
    clock = StageClock()
    tmp = out.with_name("data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.data.streaming:
        train_tok, eval_tok, tok, template, template_name, train_rep, eval_rep, report, lengths = _streamed(
            cfg, clock, tmp
        )
    else:
        train, eval_, report = _load_all(cfg, log, clock)
        where = where_from(report.pop("_locators"))
        with clock("tokenize"):
            tok = build_tokenizer(cfg.model, _corpus(train))
            gc.freeze()  # the tokenizer and what the filters left behind join the skipped objects
            template, template_name = _template(tok, cfg)
            if prepared_kind(report) != "sft":
                train_tok, train_rep, lengths = tokenize_pairs(
                    train, tok, template, cfg.data, report["kind"], "train", locate=where
                )
                eval_tok, eval_rep, _ = (
                    tokenize_pairs(eval_, tok, template, cfg.data, report["kind"], "eval", locate=where)
                    if eval_ is not None
                    else (None, None, None)
                )
            else:
                train_tok, train_rep = tokenize_split(
                    train, tok, template, cfg.data, "train", source_columns=not cfg.data.packing, locate=where
                )
                eval_tok, eval_rep = (
                    tokenize_split(eval_, tok, template, cfg.data, "eval", locate=where)
                    if eval_ is not None
                    else (None, None)
                )
                lengths = column(train_tok, "num_tokens")
    template_invalid(report, [train_rep, eval_rep], cfg.data)
    if len(lengths) == 0:
        raise ValueError(
            "data: no training rows left after tokenization (all too long, too short or with nothing to "
            "train); raise data.max_seq_len or check data.train_on"
        )
    # drawn by a child process while this one packs and saves
    histogram_done = start_length_histogram(
        lengths, cfg.data.max_seq_len, tmp / "lengths.png", f"training samples ({len(lengths)})"
    )
    if cfg.data.packing and not cfg.data.streaming:
        with clock("pack"):
            train_tok, train_rep["packing"] = pack_dataset(train_tok, cfg.data.max_seq_len)

    with clock("save"):
        train_tok.save_to_disk(str(tmp / "train"))
        shutil.rmtree(tmp / "stream-cache", ignore_errors=True)
        if eval_tok is not None:
            eval_tok.save_to_disk(str(tmp / "eval"))
        tok.save_pretrained(str(tmp / "tokenizer"))
    report = {
        "kind": "sft",
        "fingerprint": fp,
        "chat_template": template_name,
        "train_on": cfg.data.train_on,
        "max_seq_len": cfg.data.max_seq_len,
        "stop_token_ids": end_of_turn_ids(tok, template),
        **report,
        "train": train_rep,
        "eval": eval_rep,
        "seconds": clock.seconds,  # wall clock per stage of this preparation
    }
    histogram_done()
    (tmp / "data_report.json").write_text(json.dumps(report, indent=2))
    (tmp / "fingerprint.json").write_text(json.dumps(parts, indent=2))
    (tmp / "fingerprint").write_text(fp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(summary(report))


def wait_for_prepared(cfg: RunConfig, run_dir: str | Path, timeout_s: float, poll_s: float = 0.5) -> PreparedData:
    """A file barrier for ranks other than 0: wait until `<run_dir>/data` holds data whose fingerprint matches
    this config (rank 0 prepares it), then load it. No collective, so no collective timeout during a long
    preparation; raises TimeoutError naming the directory after `timeout_s`."""
    import time

    fp_file, fp = data_dir(run_dir) / "fingerprint", _digest([fingerprint_parts(cfg)])
    deadline = time.monotonic() + timeout_s
    while not (fp_file.exists() and fp_file.read_text().strip() == fp):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f}s for rank 0 to prepare {data_dir(run_dir)}; is the run "
                "directory on a file system every node shares? (raise dist.timeout_minutes for huge data)"
            )
        time.sleep(poll_s)
    return load_prepared(run_dir, reused=True)


def load_prepared(run_dir: str | Path, reused: bool = True) -> PreparedData:
    out = data_dir(run_dir)
    report = json.loads((out / "data_report.json").read_text())
    train = datasets.load_from_disk(str(out / "train"))
    eval_ = datasets.load_from_disk(str(out / "eval")) if (out / "eval").exists() else None
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return PreparedData(train, eval_, tok, report, reused)
