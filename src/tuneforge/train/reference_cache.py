"""The reference of a fully fine-tuned dpo / ipo run: the log-probs of every pair's completions under the model
before any update, computed in one pass before training and cached with the prepared data.

A LoRA run has its reference for free (the adapter switched off); a full fine-tune changes the very weights, and
keeping a second copy of the model would double its memory. So `attach_reference_logps`, called by the objective
before the first step (the model is the starting one, even on resume: checkpoints are loaded after it), runs
every train and held-out pair once through the model (eval mode, no gradient, padding-free batches, the run's
autocast and chunked head, as the loop computes the policy's), and stores the sums in
`<run>/data/reference/<key>.safetensors` ("train" and "eval": one row per pair, [chosen, rejected]). The key
hashes the data fingerprint and the model's identity (model section, precision, the seed of a new model, the
size and time of a local model's weight files): a resumed run, or a new run on the same data and model, reads
the file instead of recomputing. The values become the columns `ref_chosen_logp` / `ref_rejected_logp` of
the prepared rows, which `PairBatches` hands to the loss in place of the adapter-off pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import rows_at
from tuneforge.model.attention import runs_per_sample
from tuneforge.model.lm_loss import sequence_logps
from tuneforge.train.pair_batches import PairBatches

COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt")


def model_identity(cfg: RunConfig, precision: str) -> dict:
    """What fixes the starting model's numbers: the model section, the precision, a new model's seed, and a
    local model's weight files (name, size, modification time)."""
    ident: dict = {"model": cfg.model.model_dump(mode="json"), "precision": precision, "logits": cfg.train.logits}
    if cfg.model.init is not None:
        ident["seed"] = cfg.train.seed
    source = Path(cfg.model.name_or_path).expanduser() if cfg.model.name_or_path else None
    if source is not None and source.exists():
        files = [source] if source.is_file() else sorted(f for p in WEIGHT_FILES for f in source.rglob(p))
        ident["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return ident


def cache_path(run_dir: Path, data_fingerprint: str | None, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps([data_fingerprint, identity], sort_keys=True).encode()).hexdigest()[:16]
    return Path(run_dir) / "data" / "reference" / f"{key}.safetensors"


@torch.no_grad()
def pair_reference_logps(
    model, rows, pad_id: int, batch_size: int, chunked: bool, autocast, status: Callable[[str], None] | None = None
) -> torch.Tensor:
    """(pairs, 2) float64: the summed log-probs of each pair's chosen and rejected completion under `model`."""
    collate = PairBatches(pad_id, padding_free=True, share_prompt=runs_per_sample(model))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows_at(rows, list(range(start, min(start + batch_size, len(rows)))))
            batch = collate(chunk)
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
            with autocast():
                logps, tokens = sequence_logps(model, inputs, chunked=chunked)
            out.append(logps[tokens > 0].double().cpu().view(-1, 2))
            if status is not None:
                status(f"reference log-probs {start + len(chunk)}/{len(rows)} pairs")
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def with_columns(rows, values: torch.Tensor):
    """`rows` with the columns ref_chosen_logp, ref_rejected_logp (float64)."""
    if len(rows) != len(values):
        raise RuntimeError(f"reference log-probs for {len(values)} pairs, but the data holds {len(rows)}")
    rows = rows.remove_columns([c for c in COLUMNS if c in rows.column_names])
    for j, name in enumerate(COLUMNS):
        rows = rows.add_column(name, values[:, j].tolist())
    return rows


def attach_reference_logps(
    cfg: RunConfig, run_dir: Path, data, model, accelerator, precision: str, chunked: bool
) -> str:
    """Give data.train and data.eval their reference columns, from the cache or computed now by the main
    process (the others wait, then read the file). Returns the line to log."""
    path = cache_path(run_dir, data.report.get("fingerprint"), model_identity(cfg, precision))
    pad = data.tokenizer.pad_token_id
    splits = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    note = f"reference log-probs (full fine-tuning): read from {path}"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not path.exists():
            t = time.perf_counter()
            values = {
                name: pair_reference_logps(model, rows, pad, cfg.eval.batch_size, chunked, accelerator.autocast)
                for name, rows in splits.items()
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob("*.safetensors"):
                stale.unlink()
            tmp = path.with_suffix(".tmp")
            save_file(values, str(tmp))
            tmp.rename(path)
            pairs = sum(len(v) for v in values.values())
            note = (
                f"reference log-probs (full fine-tuning): computed for {pairs} pairs by the model before any update "
                f"in {time.perf_counter() - t:.1f}s, cached in {path}"
            )
    values = load_file(str(path))
    data.train = with_columns(data.train, values["train"])
    if data.eval is not None:
        data.eval = with_columns(data.eval, values["eval"])
    return note
