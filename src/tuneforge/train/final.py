"""`<run>/final`: the trained model as standard Hugging Face files, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.errors import TuneforgeError


class FinalWriteError(TuneforgeError):
    """final/ could not be written (disk full, read-only, ...); the message names the last good checkpoint."""

    def __init__(self, message: str, latest: Path | None):
        super().__init__(message)
        self.latest = latest


def write_final(run_dir: Path, model, state_dict: dict | None, tokenizer, stops: list[int], info: dict) -> Path:
    """Adapter or full weights (safetensors) + tokenizer + tuneforge.json into `run_dir/final`, via final.tmp.
    `state_dict`: weights gathered from a sharded strategy, or None to save the model's own. On any error the
    partial final.tmp is removed (an earlier final/ stays) and the error raised."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, model, state_dict, tokenizer, stops, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _write(tmp: Path, model, state_dict: dict | None, tokenizer, stops: list[int], info: dict) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stops
        gen.pad_token_id = tokenizer.pad_token_id
    if state_dict is None:
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:  # a gathered state dict names tied weights twice (e.g. lm_head = embed_tokens): keep the first name
        named = {n for n, _ in model.named_parameters()}
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - named
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "tuneforge.json").write_text(json.dumps({**info, "stop_token_ids": stops}, indent=2))
