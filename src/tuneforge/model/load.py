"""Load a causal LM (hub id or directory) or build a tiny one from sizes; pick dtype and attention per device."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from tuneforge.config.schema import ModelConfig, TinyModelConfig
from tuneforge.model.errors import ModelLoadError
from tuneforge.model.gguf_source import converted_base, is_gguf

__all__ = [
    "DTYPES",
    "ModelLoadError",
    "choose_attention",
    "choose_precision",
    "load_model",
    "load_pretrained",
    "load_quantized",
    "load_trained",
    "model_source",
    "pretrained_config",
    "tiny_config",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- device choices
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX (elsewhere bf16 matmuls run ~100x slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(requested: str, device: str) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if device == "cpu" and requested == "bf16" and not cpu_has_native_bf16():
        warnings.warn(
            "train.precision=bf16 on a CPU without native bf16 runs about 100x slower than fp32; "
            "use precision: auto (fp32 here)",
            UserWarning,
            stacklevel=2,
        )
    if device == "cpu" and requested == "fp16":
        raise ModelLoadError("train.precision=fp16 needs a CUDA GPU (loss scaling); use auto or fp32 on CPU")
    return requested


def choose_attention(requested: str, device: str) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if device == "cuda" and has_flash else "sdpa"
    if requested == "flash_attention_2" and (device != "cuda" or not has_flash):
        raise ModelLoadError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use auto or sdpa"
        )
    return requested


# ---------------------------------------------------------------------------- building / loading
def tiny_config(init: TinyModelConfig, tokenizer: PreTrainedTokenizerBase):
    heads = init.num_heads
    return AutoConfig.for_model(
        init.architecture,
        vocab_size=len(tokenizer),
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size or 4 * init.hidden_size,
        num_hidden_layers=init.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=init.num_kv_heads or heads,
        max_position_embeddings=init.max_position_embeddings,
        tie_word_embeddings=init.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    attention: str,
    seed: int = 0,
    log=print,
) -> PreTrainedModel:
    """The model to fine-tune, with its embeddings sized to the tokenizer."""
    if cfg.init is not None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(cfg.init, tokenizer), attn_implementation=attention)
        model = model.to(dtype)
    else:
        model = load_pretrained(model_source(cfg, dtype, log), dtype, attention, cfg.revision, cfg.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def model_source(cfg: ModelConfig, dtype: torch.dtype, log=print) -> str:
    """Where the pretrained weights load from: name_or_path, or for a .gguf file its converted safetensors copy."""
    if is_gguf(cfg.name_or_path):
        return str(converted_base(cfg.name_or_path, dtype, log))
    return cfg.name_or_path


def pretrained_config(cfg: ModelConfig):
    """The model's transformers config, read without loading weights (a GGUF file's from its metadata)."""
    if is_gguf(cfg.name_or_path):
        from tuneforge.model.gguf_source import gguf_config, inspect_gguf

        inspect_gguf(cfg.name_or_path)
        return gguf_config(cfg.name_or_path)
    return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_pretrained(
    source: str,
    dtype: torch.dtype,
    attention: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attention, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        local = Path(source).exists()
        hint = (
            f"{source} exists but holds no loadable model (config.json + weights)"
            if local
            else "this machine may not reach the Hugging Face Hub: download the model elsewhere "
            f"(`hf download {source} --local-dir DIR`) and set model.name_or_path to that directory"
        )
        raise ModelLoadError(f"could not load model {source!r}: {e}\n{hint}") from None


def load_quantized(
    source: str,
    compute_dtype: torch.dtype,
    device: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    attention: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """The frozen base of a QLoRA run: linear weights in 4 bits (bitsandbytes), computed in `compute_dtype`;
    embeddings resized up to `vocab_size` (a tokenizer with added tokens) when given."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=quant,
            dtype=compute_dtype,
            device_map={"": device},
            attn_implementation=attention,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise ModelLoadError(f"could not load model {source!r} for 4-bit QLoRA: {e}") from None
    # bitsandbytes (0.50) repacks a CPU Linear4bit's weight for a faster kernel on its first eval-mode forward,
    # and keeps that layout when training resumes: the kernel has no autograd, so gradients stop flowing
    # through the frozen layers (LoRA below them silently stops learning). Keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return model


def load_trained(
    run_or_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Load a run's result for inference: `<run>/final` (adapter + its base, or full weights) and tokenizer.

    Accepts a run directory or a `final/`-like directory. Returns (model, tokenizer, run info).
    """
    from transformers import AutoTokenizer

    path = Path(run_or_dir)
    final = path / "final" if (path / "final").is_dir() else path
    if not final.is_dir():
        raise ModelLoadError(f"{path}: no trained result here (expected {path}/final); run `tuneforge train` first")
    info_file = final / "tuneforge.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    config_file = final / "config.json"
    architectures = (json.loads(config_file.read_text()).get("architectures") or []) if config_file.exists() else []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"{final} is a reward model ({architectures[0]}: a scalar head, any LoRA adapter already merged into "
            "the body), not a causal LM to generate, serve or export: load it with "
            "transformers.AutoModelForSequenceClassification.from_pretrained"
        )
    tok = AutoTokenizer.from_pretrained(str(final))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_pretrained(base_path, dtype)
        if len(tok) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(base, str(final))
    elif (final / "config.json").exists():
        model = load_pretrained(str(final), dtype)
    else:
        raise ModelLoadError(f"{final}: neither adapter_config.json nor config.json found; is this a tuneforge run?")
    model.eval()
    return model, tok, info
