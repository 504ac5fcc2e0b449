"""STAGE: a run's `final/` -> one standard Hugging Face model directory, checked for logit parity.

LoRA / DoRA adapters are merged into their base loaded in fp32 (`merge_and_unload`), full fine-tunes are
taken as they are; the result is cast to the export dtype and written (sharded safetensors, config,
generation_config with the run's stop tokens, tokenizer with its chat template) into a temporary directory.
That directory is reloaded from disk and its logits compared with base + adapter in fp32; only when the
check passes is `parity.json` written and the directory renamed into place. With `gguf`, the directory is then
also written as one GGUF file for llama.cpp / Ollama, read back and checked (gguf_file.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.export.errors import ExportError, ExportParityError
from tuneforge.export.parity import THRESHOLDS, ParityCheck, compare, pick_prompts, prompt_logits
from tuneforge.model.load import DTYPES, ModelLoadError, load_pretrained, load_trained


@dataclass
class ExportResult:
    out_dir: Path
    dtype: str
    adapter: str  # lora | dora | full (from tuneforge.json; "unknown" when absent)
    merged: bool  # an adapter was merged into its base
    prompts: int
    prompt_source: str  # data/eval | data/train | given | fixed
    checks: list[ParityCheck] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the .gguf file, when asked for


# ---------------------------------------------------------------------------- inputs
def find_final(run_dir: Path) -> Path:
    """`<run>/final`, or the directory itself when it already holds an adapter or full weights."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    final = run_dir / "final"
    if final.is_dir():
        return final
    if (run_dir / "adapter_config.json").exists() or (run_dir / "config.json").exists():
        return run_dir
    raise ExportError(
        f"{run_dir}: no trained result here (expected {final}); the run has not finished or was "
        "stopped before saving: run `tuneforge train CONFIG` to the end, then export"
    )


def resolve_dtype(dtype: str, info: dict) -> str:
    """auto -> the run's training precision (tuneforge.json), else fp32."""
    if dtype == "auto":
        dtype = info.get("precision") or "fp32"
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def _looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id ("org/name")."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _check_base(final: Path, run_dir: Path, base_model: str | None) -> str | None:
    """The adapter's base (the override, else adapter_config.json's), or an error that says how to fix it."""
    config = final / "adapter_config.json"
    if not config.exists():
        return None
    recorded = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    base = base_model or recorded
    if base and (not _looks_local(base) or Path(base).expanduser().is_dir()):
        return base
    where = f"--base {base_model!r}" if base_model else f"{config} says base_model_name_or_path = {recorded!r}"
    hint = (
        f" This run has its own base at {run_dir / 'base'}: pass --base {run_dir / 'base'}."
        if (run_dir / "base" / "config.json").exists() and base != str(run_dir / "base")
        else ""
    )
    raise ExportError(
        f"base model not found: {where}, and there is no model directory there. If the run or the "
        "base model moved, pass the base model's directory with --base DIR (export_run(base_model=DIR)) "
        f"or fix base_model_name_or_path in adapter_config.json.{hint}"
    )


def _load_fp32(final: Path, base: str | None, base_model: str | None):
    """(model, tokenizer, info) in fp32: base + adapter (peft, unmerged) or the full weights."""
    try:
        if base_model is None or base is None:
            return load_trained(final, torch.float32)
        from peft import PeftModel
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(final))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = load_pretrained(base, torch.float32)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(model, str(final)).eval()
        info_file = final / "tuneforge.json"
        return model, tok, json.loads(info_file.read_text()) if info_file.exists() else {}
    except ModelLoadError as e:
        what = f"the adapter's base {base!r}" if base else f"{final}"
        raise ExportError(f"could not load {what}: {e}\nIf the base is elsewhere, pass --base DIR.") from None


# ---------------------------------------------------------------------------- writing
def _write(model, tok, info: dict, dtype: str, stops: list[int], tmp: Path, max_shard_size: str | int) -> None:
    model.to(DTYPES[dtype])
    model.config.use_cache = True
    gen = model.generation_config
    gen.eos_token_id = stops
    gen.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    tok.save_pretrained(str(tmp))
    if isinstance(tok.chat_template, str) and tok.chat_template:
        # transformers 5 writes the template to chat_template.jinja only; older transformers, and the serving
        # stacks pinned to them (vLLM, TGI, llama.cpp's converter), read it from tokenizer_config.json
        config_file = tmp / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.setdefault("chat_template", tok.chat_template)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (tmp / "tuneforge.json").write_text(
        json.dumps({**info, "stop_token_ids": stops, "exported_dtype": dtype}, indent=2)
    )


def _reload(tmp: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype="auto")
    stored = {p.dtype for p in model.parameters()}
    if stored != {DTYPES[dtype]}:
        raise ExportError(f"{tmp}: exported weights are {sorted(map(str, stored))}, expected {DTYPES[dtype]}")
    return model


def _check_out(out: Path, final: Path, run_root: Path) -> None:
    if out.resolve() in (final.resolve(), run_root.resolve()):
        raise ExportError(f"--out {out} would overwrite the run; choose another directory")
    if out.exists() and any(out.iterdir()) and not (out / "parity.json").exists():
        raise ExportError(
            f"--out {out} exists and is not a tuneforge export (no parity.json); remove it or choose another directory"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; a previous export there is moved aside first and removed once the new one is in place."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- the stage
def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    dtype: str = "auto",
    prompts: list | None = None,
    *,
    base_model: str | None = None,
    max_shard_size: str | int = "5GB",
    num_prompts: int = 4,
    max_prompt_tokens: int = 128,
    gguf: str | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Merge (if an adapter) and write `<run>/final` as a Hugging Face directory (default `<run>/export`).

    dtype: auto (the run's training precision) | fp32 | bf16 | fp16. prompts: text, chat messages or token
    ids for the parity check (default: held-out rows of the run's data). base_model overrides the
    adapter's recorded base. Raises ExportError (inputs) or ExportParityError (numbers); on either, no
    new directory is left at `out_dir` (a previous export there stays as it was).
    gguf: f32 | f16 | bf16 | q8_0 also writes `<out>/<run name>-<TYPE>.gguf` from the exported directory (the
    architecture is checked before anything is merged); GGUFExportError / GGUFCheckError if it cannot be written
    or does not read back equal, the Hugging Face export staying in place.
    """
    run_dir = Path(run_dir)
    final = find_final(run_dir)
    run_root = run_dir if final != run_dir else run_dir.parent
    out = Path(out_dir) if out_dir is not None else run_root / "export"
    _check_out(out, final, run_root)
    info_file = final / "tuneforge.json"
    dtype = resolve_dtype(dtype, json.loads(info_file.read_text()) if info_file.exists() else {})
    if gguf is not None:
        _check_gguf_extra(gguf)
    base = _check_base(final, run_root, base_model)
    if base_model is not None and base is None:
        log(f"export: {final} holds full weights; --base {base_model} is not used")

    model, tok, info = _load_fp32(final, base, base_model)
    if gguf is not None:
        from tuneforge.export.gguf_file import arch_of

        arch_of(model.config.to_dict())  # an unsupported architecture fails now, not after the merge
    adapter = info.get("adapter", "unknown")
    merged = base is not None
    stops = [int(t) for t in (info.get("stop_token_ids") or [tok.eos_token_id])]
    rows, source = pick_prompts(run_root, tok, prompts, num_prompts, max_prompt_tokens)
    log(
        f"export: {final} ({adapter}{', merging into ' + base if merged else ''}) -> {out} as {dtype}; "
        f"parity on {len(rows)} prompts from {source}"
    )

    reference = prompt_logits(model, rows)  # base + adapter, fp32: the numbers the export must reproduce
    checks: list[ParityCheck] = []
    if merged:
        model = model.merge_and_unload(safe_merge=True)
        checks.append(compare("merge", reference, prompt_logits(model, rows), "fp32"))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(model, tok, info, dtype, stops, tmp, max_shard_size)
        del model
        checks.append(compare("export", reference, prompt_logits(_reload(tmp, dtype), rows), dtype))
        for c in checks:
            log(f"parity {c.describe()}")
        failed = [c for c in checks if not c.passed]
        if failed:
            raise ExportParityError(
                f"export of {final} failed the parity check, nothing was written to {out}: "
                + "; ".join(c.describe() for c in failed)
                + ". A failing 'merge' check means the merged weights are wrong (try another peft version or "
                "report it); a failing 'export' check alone means the saved weights or the dtype cast are wrong "
                "(try --dtype fp32).",
                checks,
            )
        parity = {
            "dtype": dtype,
            "compute_dtype": "fp32",
            "prompts": len(rows),
            "prompt_source": source,
            "positions": checks[-1].positions,
            "source": str(final.resolve()),
            "adapter": adapter,
            "merged": merged,
            "thresholds": {c.name: vars(THRESHOLDS[c.dtype]) for c in checks},
            "checks": [c.to_dict() for c in checks],
            "passed": True,
        }
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    log(f"exported {out} ({', '.join(files)})")
    result = ExportResult(
        out_dir=out,
        dtype=dtype,
        adapter=adapter,
        merged=merged,
        prompts=len(rows),
        prompt_source=source,
        checks=checks,
        files=files,
    )
    if gguf is not None:
        from tuneforge.export.gguf_file import export_gguf

        result.gguf = export_gguf(
            out, out / f"{run_root.name}-{gguf.upper()}.gguf", gguf, name=run_root.name, log=log
        ).path
        result.files = sorted(p.name for p in out.iterdir())
    return result


def _check_gguf_extra(gguf_type: str) -> None:
    """The `gguf` package is there and the type is one it writes; checked before any work is done."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("--gguf needs the gguf package (not installed): pip install 'tuneforge[gguf]'") from None
    from tuneforge.export.gguf_file import GGUF_TYPES

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
