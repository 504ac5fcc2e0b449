"""What `serve` and `chat` need to know about the model they serve: weights, tokenizer, template, stops, context.

Both read the same things from a run (`RUN` or `RUN/final`, adapter + base or full weights) or an exported
directory, so the chat template and stop tokens are the ones training used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tuneforge.data.templates import resolve_template
from tuneforge.model.load import load_trained

GENERIC_DIR_NAMES = {"final", "export", "merged"}


@dataclass
class ServedModel:
    """A loaded model ready for generation, with everything a request is checked against."""

    model: object
    tokenizer: PreTrainedTokenizerBase
    name: str  # the id clients pass as "model"
    chat_template: str
    stop_token_ids: list[int]
    context_length: int
    source: Path


def served_name(path: Path) -> str:
    """The model id: the run's name (`runs/qs`, `runs/qs/final` and `runs/qs/export` all give `qs`)."""
    path = path.resolve()
    return path.parent.name if path.name in GENERIC_DIR_NAMES and path.parent.name else path.name


def stop_ids_of(model, tokenizer: PreTrainedTokenizerBase, info: dict) -> list[int]:
    """Union of the run's end-of-turn ids, generation_config's eos ids and the tokenizer's eos (order kept)."""
    found: list[int] = list(info.get("stop_token_ids") or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    found.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(t) for t in found if t is not None))


def load_served(path: str | Path, name: str | None = None, device: str = "auto") -> ServedModel:
    """Load a run or model directory for serving: fp32 on CPU, bf16 (fp16 on older GPUs) on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model, tok, info = load_trained(path, dtype)
    model = model.to(device).eval()
    has_own = isinstance(tok.chat_template, str) and bool(tok.chat_template)
    template = tok.chat_template if has_own else resolve_template(tok, "auto")[0]  # training's fallback too
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(tok, "model_max_length", 2048)
    return ServedModel(
        model=model,
        tokenizer=tok,
        name=name or served_name(Path(path)),
        chat_template=template,
        stop_token_ids=stop_ids_of(model, tok, info),
        context_length=int(context),
        source=Path(path),
    )


def kv_bytes_per_token(model) -> int:
    """Bytes the KV cache takes per position: layers x (key + value) x key/value heads x head size x dtype size."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return int(config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize)
