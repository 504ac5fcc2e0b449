"""A GGUF file (llama.cpp / Ollama) as the model to fine-tune.

The file is checked first (magic, header, tensor data within the file, an architecture and tensor types
transformers can read), then dequantised by transformers' GGUF support into the run's precision and
written once as a normal safetensors model directory (+ tokenizer), cached by the file's hash under
`$TUNEFORGE_CACHE/gguf/` (default `~/.cache/tuneforge`). The second run loads that directory in about a
second; an adapter refers to it like any other base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.gguf_path import is_gguf, resolve_gguf_path
from tuneforge.model.errors import ModelLoadError

__all__ = [
    "GGUFError",
    "GGUFInfo",
    "cache_root",
    "converted_base",
    "gguf_config",
    "inspect_gguf",
    "is_gguf",
    "link_base",
]

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "TUNEFORGE_CACHE"
DONE_FILE = "tuneforge-gguf.json"
# llama.cpp's architecture names that transformers knows under another name
ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
NOT_CAUSAL_LM = {"t5", "t5encoder", "umt5"}
UNQUANTISED = {"F32", "F16", "BF16", "F64"}


class GGUFError(ModelLoadError):
    """A GGUF file that cannot be fine-tuned from: the message names the file, the reason and what to do."""


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    name: str
    tensor_types: list[str]
    tensors: int
    size: int


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneforge"


def _field(reader, key: str) -> str:
    f = reader.fields.get(key)
    return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f is not None and f.data else ""


def _readable_types() -> set[str] | None:
    """The tensor types gguf-py can dequantise (None when this gguf version does not say)."""
    import gguf.quants

    traits = getattr(gguf.quants, "_type_traits", None)
    return None if traits is None else UNQUANTISED | {t.name for t in traits}


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Header, architecture and tensor types of a GGUF file, or a GGUFError that says what is wrong with it."""
    p = resolve_gguf_path(path)
    if not p.is_file():
        raise GGUFError(
            f"model.name_or_path {str(path)!r}: no such file (nor in an installed package of that name). "
            "Point it at a .gguf file (llama.cpp / Ollama), a Hugging Face model directory or a hub id"
        )
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(
            f"{p} is not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF'). Point "
            "model.name_or_path at a llama.cpp GGUF file, or at a Hugging Face model directory"
        )
    done = _converted(p)
    if done is not None:  # this very file (same hash) was read and converted before
        rec = json.loads((done / DONE_FILE).read_text())
        return GGUFInfo(
            p, rec["architecture"], rec.get("name", ""), rec["tensor_types"], rec.get("tensors", 0), p.stat().st_size
        )
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"{p}: reading a GGUF file needs the gguf package: pip install 'tuneforge[gguf]'") from None
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, struct errors on damaged files
        raise GGUFError(
            f"{p} is truncated or corrupt: its header or tensor table cannot be read ({type(e).__name__}: "
            f"{str(e)[:200]}). The file has {size:,} bytes; download or copy it again"
        ) from None
    if end > size:
        raise GGUFError(
            f"{p} is truncated: its tensors need {end:,} bytes, the file has {size:,}. Download or copy it again"
        )
    if not reader.tensors:
        raise GGUFError(f"{p} holds no tensors (a vocabulary-only GGUF?); use a GGUF with the model's weights")
    arch = _field(reader, "general.architecture")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = ARCH_ALIASES.get(arch, arch)
    if known in NOT_CAUSAL_LM or (
        arch not in GGUF_SUPPORTED_ARCHITECTURES and known not in GGUF_SUPPORTED_ARCHITECTURES
    ):
        readable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_CAUSAL_LM | {"general", "tokenizer"})
        raise GGUFError(
            f"{p}: architecture {arch!r} cannot be read by transformers' GGUF support (it reads: "
            f"{', '.join(readable)}). Use the model's Hugging Face checkpoint instead "
            "(model.name_or_path: a hub id or directory)"
        )
    types = sorted({t.tensor_type.name for t in reader.tensors})
    readable_types = _readable_types()
    if readable_types is not None and set(types) - readable_types:
        raise GGUFError(
            f"{p}: tensor type(s) {', '.join(sorted(set(types) - readable_types))} cannot be dequantised "
            f"by gguf {getattr(gguf, '__version__', '')} (readable: F32, F16, BF16, Q4_0 ... Q8_0, K-quants "
            "and most IQ types). Use a GGUF of another quantisation (Q8_0, Q4_K_M, F16) or the "
            "Hugging Face checkpoint"
        )
    return GGUFInfo(p, arch, _field(reader, "general.name"), types, len(reader.tensors), size)


def file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes (about 10 GB/s: a 4 GB GGUF in under a second from the page cache)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_prefix(path: Path) -> str:
    return f"{path.stem}-{file_digest(path)[:16]}"


def _converted(path: Path) -> Path | None:
    """A finished conversion of this file (any precision), or None."""
    folder = cache_root() / "gguf"
    if not folder.is_dir():
        return None
    prefix = _cache_prefix(path)
    return next((d for d in sorted(folder.glob(f"{prefix}-*")) if (d / DONE_FILE).is_file()), None)


def gguf_config(path: str | Path):
    """The transformers config of a GGUF file, from its metadata only (no tensor is read)."""
    from transformers import AutoConfig

    p = resolve_gguf_path(path)
    done = _converted(p)
    if done is not None:
        return AutoConfig.from_pretrained(str(done))
    return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)


def converted_base(path: str | Path, dtype: torch.dtype, log: Callable[[str], None] = print) -> Path:
    """The GGUF file as a safetensors model directory in `dtype`: converted once, then found by the file's hash."""
    info = inspect_gguf(path)
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / "gguf" / f"{_cache_prefix(info.path)}-{dtype_name}"
    if (target / DONE_FILE).exists():
        log(f"model: {info.path.name} converted before, loading {target}")
        return target
    log(
        f"model: converting {info.path.name} ({info.architecture}, {info.tensors} tensors of type "
        f"{'/'.join(info.tensor_types)}, {info.size / 2**20:.0f} MiB) to a {dtype_name} safetensors base in {target} "
        "(once; later runs load it in seconds)"
    )
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(info, dtype, tmp)
        (tmp / DONE_FILE).write_text(
            json.dumps(
                {
                    "gguf_file": str(info.path.resolve()),
                    "architecture": info.architecture,
                    "name": info.name,
                    "tensor_types": info.tensor_types,
                    "tensors": info.tensors,
                    "dtype": dtype_name,
                    "bytes": info.size,
                },
                indent=2,
            )
        )
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (target / DONE_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except GGUFError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers / gguf-py raise, said with the file's name
        shutil.rmtree(tmp, ignore_errors=True)
        raise GGUFError(
            f"{info.path}: transformers could not convert this {info.architecture} GGUF "
            f"({type(e).__name__}: {str(e)[:300]}). Use the model's Hugging Face checkpoint instead"
        ) from e
    return target


def _convert(info: GGUFInfo, dtype: torch.dtype, out: Path) -> None:
    """Dequantise with transformers, then save through a model built from the same config without the GGUF
    quantisation record (transformers refuses to save a model loaded from GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFError(
            f"{info.path}: the converted weights do not match a {config.model_type} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    fresh.tie_weights()
    del loaded
    fresh.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out))


def link_base(converted: Path, base_dir: Path) -> Path:
    """The run's `base/`: the converted files hard-linked (copied across file systems), so the adapter's base
    stays with the run even when the cache is cleared."""
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in converted.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(base_dir, ignore_errors=True)
    tmp.rename(base_dir)
    return base_dir
