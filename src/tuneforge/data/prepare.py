"""STAGE: load -> normalise -> split -> tokenize (+labels) -> truncate/drop -> save + report.

Writes `<run>/data/`:
  train/, eval/        `datasets` on disk (load_from_disk): input_ids, labels, messages, text, num_tokens, num_trained
  tokenizer/           the tokenizer used (with its chat template); later stages load it from here
  data_report.json     rows, tokens, trained tokens, truncated and dropped rows, per source
  fingerprint          hash of every input; an identical fingerprint means the cache is reused
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge import __version__
from tuneforge.config.schema import RunConfig
from tuneforge.data.formats import normalize, read_source
from tuneforge.data.templates import IGNORE_INDEX, end_of_turn_ids, resolve_template, tokenize_chat, tokenize_text
from tuneforge.data.tokenizer import build_tokenizer


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


def fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that changes the prepared data: data config, sources' bytes, tokenizer, version."""
    h = hashlib.sha256()
    tok_cfg = {
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "trained_vocab": cfg.model.init.tokenizer_vocab_size if cfg.model.init and not cfg.model.tokenizer else None,
    }
    h.update(json.dumps({"data": cfg.data.model_dump(mode="json"), "tok": tok_cfg, "v": __version__}, sort_keys=True).encode())
    sources = [*cfg.data.train, *([cfg.data.eval] if cfg.data.eval else [])]
    for src in sources:
        if src.path and Path(src.path).exists():
            _hash_path(h, Path(src.path))
    for p in (tok_cfg["tokenizer"], cfg.data.chat_template):
        if p and Path(p).exists():
            _hash_path(h, Path(p))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- stages
def _load_all(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None, list[dict]]:
    parts, per_source = [], []
    for src in cfg.data.train:
        raw, name = read_source(src)
        parts.append(normalize(raw, src, name, cfg.data.num_proc))
        per_source.append({"source": name, "rows": len(raw)})
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if cfg.data.eval is not None:
        raw, name = read_source(cfg.data.eval)
        return train, normalize(raw, cfg.data.eval, name, cfg.data.num_proc), per_source
    if cfg.data.eval_fraction > 0:
        split = train.train_test_split(test_size=cfg.data.eval_fraction, seed=cfg.data.seed)
        return split["train"], split["test"], per_source
    return train, None, per_source


def _corpus(ds: datasets.Dataset):
    for row in ds:
        yield row["text"] or "\n".join(m["content"] for m in row["messages"])


def _tokenize(ds: datasets.Dataset, tok: PreTrainedTokenizerBase, template: str, cfg: RunConfig, split: str) -> tuple[datasets.Dataset, dict]:
    max_len, overlong, train_on = cfg.data.max_seq_len, cfg.data.overlong, cfg.data.train_on

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "num_trained": [], "truncated": [], "keep": []}
        for msgs, text in zip(batch["messages"], batch["text"]):
            ids, labels = tokenize_chat(tok, template, msgs, train_on) if msgs else tokenize_text(tok, text)
            truncated = len(ids) > max_len
            if truncated and overlong == "truncate":
                ids, labels = ids[:max_len], labels[:max_len]
            trained = sum(1 for x in labels if x != IGNORE_INDEX)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["num_tokens"].append(len(ids))
            out["num_trained"].append(trained)
            out["truncated"].append(truncated)
            out["keep"].append(not (truncated and overlong == "drop") and trained > 0)
        return out

    n_proc = cfg.data.num_proc if len(ds) >= 1000 else None
    enc = ds.map(encode, batched=True, batch_size=256, num_proc=n_proc, desc=f"tokenize {split}")
    truncated = sum(enc["truncated"])
    kept = enc.filter(lambda b: b["keep"], batched=True, desc=f"drop {split}").remove_columns(["keep", "truncated"])
    dropped_overlong = truncated if overlong == "drop" else 0
    report = {
        "rows_in": len(ds),
        "rows": len(kept),
        "tokens": int(sum(kept["num_tokens"])),
        "trained_tokens": int(sum(kept["num_trained"])),
        "truncated_rows": truncated if overlong == "truncate" else 0,
        "dropped_overlong_rows": dropped_overlong,
        "dropped_untrained_rows": len(ds) - len(kept) - dropped_overlong,
        "max_tokens": int(max(kept["num_tokens"], default=0)),
    }
    return kept, report


def prepare(cfg: RunConfig, run_dir: str | Path, force: bool = False, log=print) -> PreparedData:
    """Run the data stage into `<run_dir>/data`, or reuse it when its fingerprint matches."""
    out = data_dir(run_dir)
    fp = fingerprint(cfg)
    fp_file = out / "fingerprint"
    if not force and fp_file.exists() and fp_file.read_text().strip() == fp:
        log(f"data: reusing prepared data in {out} (fingerprint {fp} unchanged)")
        return load_prepared(run_dir, reused=True)
    if fp_file.exists():
        log(f"data: inputs changed (fingerprint {fp_file.read_text().strip()} -> {fp}); preparing again")

    train, eval_, per_source = _load_all(cfg)
    tok = build_tokenizer(cfg.model, _corpus(train))
    template, template_name = resolve_template(tok, cfg.data.chat_template)
    if template_name != "tokenizer":
        tok.chat_template = template  # saved with the tokenizer, so generation uses the training template
    train_tok, train_rep = _tokenize(train, tok, template, cfg, "train")
    if len(train_tok) == 0:
        raise ValueError("data: no training rows left after tokenization (all dropped); see data_report.json")
    eval_tok, eval_rep = _tokenize(eval_, tok, template, cfg, "eval") if eval_ is not None else (None, None)

    tmp = out.with_name("data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_tok.save_to_disk(str(tmp / "train"))
    if eval_tok is not None:
        eval_tok.save_to_disk(str(tmp / "eval"))
    tok.save_pretrained(str(tmp / "tokenizer"))
    report = {
        "fingerprint": fp,
        "chat_template": template_name,
        "train_on": cfg.data.train_on,
        "max_seq_len": cfg.data.max_seq_len,
        "stop_token_ids": end_of_turn_ids(tok, template),
        "sources": per_source,
        "train": train_rep,
        "eval": eval_rep,
    }
    (tmp / "data_report.json").write_text(json.dumps(report, indent=2))
    (tmp / "fingerprint").write_text(fp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(summary(report))
    return load_prepared(run_dir, reused=False)


def load_prepared(run_dir: str | Path, reused: bool = True) -> PreparedData:
    out = data_dir(run_dir)
    report = json.loads((out / "data_report.json").read_text())
    train = datasets.load_from_disk(str(out / "train"))
    eval_ = datasets.load_from_disk(str(out / "eval")) if (out / "eval").exists() else None
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return PreparedData(train, eval_, tok, report, reused)


def summary(report: dict) -> str:
    lines = [f"data: template={report['chat_template']} train_on={report['train_on']} max_seq_len={report['max_seq_len']}"]
    for split in ("train", "eval"):
        r = report.get(split)
        if r:
            lines.append(
                f"  {split}: {r['rows']} rows ({r['rows_in']} in), {r['tokens']} tokens, {r['trained_tokens']} trained, "
                f"{r['truncated_rows']} truncated, {r['dropped_overlong_rows']} dropped as too long, "
                f"{r['dropped_untrained_rows']} dropped with nothing to train"
            )
    return "\n".join(lines)
