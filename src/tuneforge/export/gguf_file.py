"""GGUF for llama.cpp / Ollama: a Hugging Face model directory -> one .gguf file, read back and checked.

Written with the `gguf` package (the `gguf` extra), one tensor at a time (memory: the largest tensor):
  metadata   general.* (name, file type), {arch}.* hyperparameters (context, widths, layers, heads, RMS-norm
             epsilon, RoPE base / dimensions / scaling) and tokenizer.* (gguf_tokenizer.py, with the export's
             chat template and stop ids)
  tensors    Hugging Face names mapped by gguf.TensorNameMap (model.layers.0.self_attn.q_proj.weight ->
             blk.0.attn_q.weight). Llama's Q and K rows are permuted: Hugging Face rotates the two halves of a
             head's dimensions, llama.cpp adjacent pairs. Norms, biases and 1-D tensors are F32, the rest
             the chosen type: f32 | f16 | bf16 | q8_0 (rows not a multiple of 32 fall back to f16).
The round trip reads the file back with gguf.GGUFReader and compares every metadata value with what was
written, the token list with the tokenizer's own id -> token table, sample text decoded through the GGUF
spelling with the tokenizer's decoding, and every tensor's name, type, shape and values with the source after
undoing the permutation: bit-exact for f32/f16/bf16 (the source cast to that type), within one quantization
step of its 32-value block for q8_0. A mismatch removes the file and raises GGUFCheckError.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from tuneforge.export.errors import GGUFCheckError, GGUFExportError
from tuneforge.export.gguf_tokenizer import Vocab, detokenize, metadata, read_vocab

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
TORCH_OF = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# Hugging Face model_type -> llama.cpp architecture (Mistral without sliding-window attention is a Llama)
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
SUPPORTED = "llama (LlamaForCausalLM), mistral (MistralForCausalLM) and qwen2 (Qwen2ForCausalLM)"
SAMPLE_TEXTS = ["Hello world! 1234 numbers, punctuation... and    spaces.", "naïve café, 東京 and emoji 🚀\nnew line"]


@dataclass
class TensorSpec:
    """One GGUF tensor: its name, where it comes from, its (PyTorch-order) shape and stored type."""

    name: str
    source: str | None  # Hugging Face tensor name; None for a generated tensor
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int | None = None  # Q/K: permuted for llama.cpp's RoPE, per head group
    data: np.ndarray | None = None  # generated tensors (rope_freqs)


@dataclass
class GGUFPlan:
    arch: str  # llama.cpp name: llama | qwen2
    metadata: dict[str, object]
    tensors: list[TensorSpec]
    vocab: Vocab
    notes: list[str] = field(default_factory=list)  # things the user should know, logged


@dataclass
class GGUFResult:
    path: Path
    arch: str
    gguf_type: str
    tensors: int
    vocab_size: int
    tokenizer: str  # "gpt2 (gpt-2)", "llama (default)", ...
    bytes: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # by stored type, over all tensors


# ---------------------------------------------------------------------------- what goes in
def arch_of(config: dict) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture for a config.json, or an error naming the supported ones."""
    model_type = config.get("model_type")
    arch = ARCHES.get(model_type)
    if arch is None:
        names = ", ".join(config.get("architectures") or []) or "?"
        raise GGUFExportError(
            f"GGUF export supports {SUPPORTED}; this model is {model_type!r} ({names}). Use "
            "llama.cpp's convert_hf_to_gguf.py on the exported directory for other architectures."
        )
    if config.get("num_local_experts"):
        raise GGUFExportError(f"GGUF export supports dense {SUPPORTED} models, not mixture-of-experts ones")
    return arch


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half row order of each head -> llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_qk` (the check's own, written from the other side)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict) -> tuple[float, str, dict]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return theta, rope.get("rope_type", rope.get("type")) or "default", rope


def _llama3_rope_factors(cfg: dict, rope: dict, head_dim: int, theta: float) -> np.ndarray:
    """Llama-3.1's per-frequency RoPE scaling, which llama.cpp reads from a `rope_freqs` tensor."""
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


class SafetensorsSource:
    """The tensors of a model directory's safetensors files, read one at a time."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        elif (model_dir / "model.safetensors").exists():
            files = None
        else:
            raise GGUFExportError(
                f"{model_dir}: no model.safetensors(.index.json); GGUF export reads safetensors "
                "(`tuneforge export` writes them)"
            )
        names = sorted(set(files.values())) if files else ["model.safetensors"]
        self._open = {n: safe_open(str(model_dir / n), framework="pt") for n in names}
        self.file_of = files or {k: "model.safetensors" for k in self._open["model.safetensors"].keys()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open[self.file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._open[self.file_of[name]].get_tensor(name)


def plan_gguf(model_dir: Path, gguf_type: str, source: SafetensorsSource, name: str) -> GGUFPlan:
    """Metadata and tensor list of the GGUF file for `model_dir` (nothing is written)."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    model_arch = arch_of(cfg)
    arch = gguf.MODEL_ARCH_NAMES[model_arch]
    qtype, file_type = GGUF_TYPES[gguf_type]
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    theta, rope_type, rope = _rope(cfg)
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    meta: dict[str, object] = {
        gguf.Keys.General.TYPE: "model",
        gguf.Keys.General.NAME: name,
        gguf.Keys.General.FILE_TYPE: int(file_type),
        gguf.Keys.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION,
        K.CONTEXT_LENGTH: cfg["max_position_embeddings"],
        K.EMBEDDING_LENGTH: hidden,
        K.BLOCK_COUNT: layers,
        K.FEED_FORWARD_LENGTH: cfg["intermediate_size"],
        K.VOCAB_SIZE: cfg["vocab_size"],
        A.HEAD_COUNT: heads,
        A.HEAD_COUNT_KV: kv_heads,
        A.LAYERNORM_RMS_EPS: float(cfg.get("rms_norm_eps", 1e-6)),
        A.KEY_LENGTH: head_dim,
        A.VALUE_LENGTH: head_dim,
        R.DIMENSION_COUNT: head_dim,
        R.FREQ_BASE: theta,
    }
    extra: list[TensorSpec] = []
    if rope_type == "linear":
        meta[R.SCALING_TYPE], meta[R.SCALING_FACTOR] = "linear", float(rope["factor"])
    elif rope_type == "llama3" and model_arch == gguf.MODEL_ARCH.LLAMA:
        factors = _llama3_rope_factors(cfg, rope, head_dim, theta)
        extra.append(
            TensorSpec(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, factors.shape, Q.F32, data=factors
            )
        )
    elif rope_type != "default":
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: RoPE scaling {rope_type!r} is not supported by this "
            "GGUF export (default, linear, and llama3 for Llama are); use llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    notes = []
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < cfg["max_position_embeddings"]:
        notes.append(
            f"sliding_window {window} is shorter than the context: llama.cpp attends to the whole context, "
            f"so past {window} tokens its outputs differ from transformers'"
        )
    meta = {k.format(arch=arch): v for k, v in meta.items()}

    names = gguf.get_tensor_name_map(model_arch, layers)
    tied = bool(cfg.get("tie_word_embeddings"))
    tensors = list(extra)
    for hf in source.file_of:
        if hf.endswith("rotary_emb.inv_freq") or (tied and hf == "lm_head.weight"):
            continue
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GGUFExportError(
                f"{model_dir}: tensor {hf!r} has no llama.cpp name for {arch}; this model has parts "
                "llama.cpp's graph does not have, so it cannot be exported to GGUF"
            )
        shape = source.shape(hf)
        dims_ok = len(shape) > 1 and mapped.endswith(".weight") and not mapped.endswith("_norm.weight")
        stored = qtype if dims_ok else Q.F32
        if stored == Q.Q8_0 and shape[-1] % 32:
            stored = Q.F16
        permute = None
        if model_arch == gguf.MODEL_ARCH.LLAMA and ".attn_q." in mapped:
            permute = heads
        elif model_arch == gguf.MODEL_ARCH.LLAMA and ".attn_k." in mapped:
            permute = kv_heads
        tensors.append(TensorSpec(mapped, hf, shape, stored, permute))
    if not tied and not any(t.name == "output.weight" for t in tensors):
        raise GGUFExportError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false in config.json")
    rows = next((t.shape[0] for t in tensors if t.name == "token_embd.weight"), None)
    if rows != cfg["vocab_size"]:
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: vocab_size {cfg['vocab_size']} but the embedding has "
            f"{rows} rows; llama.cpp would refuse the file. Save the model again with "
            "save_pretrained after resize_token_embeddings"
        )

    gen_file = model_dir / "generation_config.json"
    eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.exists() else None
    stops = eos if isinstance(eos, list) else [eos] if eos is not None else []
    vocab = read_vocab(model_dir, cfg["vocab_size"], [int(t) for t in stops])
    meta.update(metadata(vocab))
    if vocab.chat_template is None:
        notes.append("the tokenizer has no chat template: llama.cpp / Ollama users must give one")
    return GGUFPlan(arch=arch, metadata=meta, tensors=tensors, vocab=vocab, notes=notes)


# ---------------------------------------------------------------------------- writing
def _nbytes(spec: TensorSpec) -> int:
    block, size = gguf.GGML_QUANT_SIZES[spec.qtype]
    return math.prod(spec.shape) // block * size


def _encoded(spec: TensorSpec, source: SafetensorsSource) -> np.ndarray:
    data = spec.data if spec.data is not None else source.get(spec.source).float().numpy()
    if spec.permute_heads:
        data = permute_qk(data, spec.permute_heads)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), spec.qtype)


def write_gguf(plan: GGUFPlan, source: SafetensorsSource, path: Path) -> None:
    """Write the file: header, metadata, tensor index, then the tensors one by one."""
    writer = gguf.GGUFWriter(path, plan.arch)
    for key, value in plan.metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    for spec in plan.tensors:
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), _nbytes(spec), raw_dtype=spec.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for spec in plan.tensors:
            writer.write_tensor_data(_encoded(spec, source))
    finally:
        writer.close()


# ---------------------------------------------------------------------------- reading back
def _same(got, want) -> bool:
    if isinstance(want, float):
        return np.float32(got) == np.float32(want)
    if isinstance(want, list) and want and isinstance(want[0], float):
        return np.array_equal(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32))
    return got == want


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _tensor_problem(spec: TensorSpec, tensor, source: SafetensorsSource, worst: dict[str, float]) -> str | None:
    if tensor.tensor_type != spec.qtype:
        return f"{spec.name}: stored as {tensor.tensor_type.name}, planned {spec.qtype.name}"
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if shape != tuple(spec.shape):
        return f"{spec.name}: shape {shape}, source {tuple(spec.shape)}"
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(spec.shape).astype(np.float32)
    if spec.permute_heads:
        got = unpermute_qk(got, spec.permute_heads)
    src = torch.from_numpy(spec.data) if spec.data is not None else source.get(spec.source)
    if spec.qtype in TORCH_OF:  # a plain cast: the file must hold exactly the source rounded to that type
        want = src.to(TORCH_OF[spec.qtype]).float().numpy()
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        worst[spec.qtype.name] = max(worst.get(spec.qtype.name, 0.0), diff)
        return None if np.array_equal(got, want) else f"{spec.name}: max |diff| {diff:.3g} from the source (expected 0)"
    want = src.float().numpy()
    blocks = np.abs(want).reshape(-1, 32)
    diff = np.abs(got - want).reshape(-1, 32)
    worst[spec.qtype.name] = max(worst.get(spec.qtype.name, 0.0), float(diff.max()))
    allowed = blocks.max(axis=1, keepdims=True) / 127  # one quantization step (rounding gives at most half)
    bad = diff > allowed + 1e-12
    if bad.any():
        return (
            f"{spec.name}: {int(bad.sum())} values off by more than one q8_0 step of their block "
            f"(max |diff| {float(diff.max()):.3g})"
        )
    return None


def check_gguf(
    path: Path, plan: GGUFPlan, source: SafetensorsSource, model_dir: Path, label: str | None = None
) -> dict[str, float]:
    """Read `path` back and compare it with the plan, the tokenizer and the source tensors. Returns the max |diff|
    per stored type; raises GGUFCheckError listing what differs."""
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(path)
    problems: list[str] = []
    if reader.fields[gguf.Keys.General.ARCHITECTURE].contents() != plan.arch:
        problems.append(f"general.architecture is not {plan.arch!r}")
    for key, want in plan.metadata.items():
        got = reader.fields[key].contents() if key in reader.fields else "<missing>"
        if not _same(got, want):
            problems.append(f"{key}: wrote {_short(want)}, read {_short(got)}")

    # the token list against the tokenizer's own table (not the tokenizer.json the plan was made from)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    user = {i for i, t in enumerate(plan.vocab.types) if t == gguf.TokenType.USER_DEFINED}
    table = tok.convert_ids_to_tokens(list(range(len(tok))))
    wrong = [i for i, t in enumerate(table) if (t.replace("\u2581", " ") if i in user else t) != tokens[i]]
    if wrong:
        i = wrong[0]
        problems.append(f"{len(wrong)} tokens differ from the tokenizer's, first id {i}: {tokens[i]!r} vs {table[i]!r}")
    specials = {"eos": tok.eos_token_id, "bos": tok.bos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    for kind, want_id in specials.items():
        field_ = reader.fields.get(getattr(gguf.Keys.Tokenizer, f"{kind.upper()}_ID"))
        got_id = field_.contents() if field_ is not None else None
        if got_id != want_id:
            problems.append(f"tokenizer.ggml.{kind}_token_id is {got_id}, the tokenizer's is {want_id}")
    for text in SAMPLE_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want_text = tok.decode(ids, clean_up_tokenization_spaces=False)
        got_text = detokenize(tokens, plan.vocab.model, ids)
        if got_text.lstrip(" ") != want_text.lstrip(" "):
            problems.append(
                f"{text!r} decodes to {got_text!r} through the GGUF tokens, {want_text!r} through the tokenizer"
            )

    found = {t.name: t for t in reader.tensors}
    planned = {s.name for s in plan.tensors}
    if set(found) != planned:
        problems.append(
            f"tensors missing {sorted(planned - set(found))[:5]}, unexpected {sorted(set(found) - planned)[:5]}"
        )
    worst: dict[str, float] = {}
    for spec in plan.tensors:
        if spec.name in found and (problem := _tensor_problem(spec, found[spec.name], source, worst)):
            problems.append(problem)
    if problems:
        raise GGUFCheckError(
            f"GGUF round-trip check of {label or path.name} failed ({len(problems)} problems): "
            + "; ".join(problems[:6])
            + ("; ..." if len(problems) > 6 else "")
        )
    return worst


# ---------------------------------------------------------------------------- the whole step
def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    gguf_type: str = "f16",
    *,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> GGUFResult:
    """Write `model_dir` (a Hugging Face directory with safetensors and tokenizer.json) as `out_file` and check
    it by reading it back. Raises GGUFExportError (unsupported model) or GGUFCheckError (the file differs from its
    source); on either, no file is left at `out_file`."""
    model_dir, out_file = Path(model_dir), Path(out_file)
    source = SafetensorsSource(model_dir)
    plan = plan_gguf(model_dir, gguf_type, source, name or model_dir.name)
    for note in plan.notes:
        log(f"gguf: note: {note}")
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        write_gguf(plan, source, tmp)
        try:
            worst = check_gguf(tmp, plan, source, model_dir, label=out_file.name)
        except GGUFCheckError as e:
            raise GGUFCheckError(
                f"{e}. Nothing was written to {out_file}; please report this with the model's config.json"
            ) from None
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)
    v = plan.vocab
    result = GGUFResult(
        path=out_file,
        arch=plan.arch,
        gguf_type=gguf_type,
        tensors=len(plan.tensors),
        vocab_size=len(v.tokens),
        tokenizer=f"{v.model} ({v.pre})",
        bytes=out_file.stat().st_size,
        max_abs_diff=worst,
    )
    log(
        f"gguf: {out_file} ({plan.arch}, {gguf_type}, {result.tensors} tensors, {result.vocab_size} tokens, tokenizer "
        f"{result.tokenizer}, {result.bytes / 2**20:.1f} MiB); round trip ok, max |diff| "
        + ", ".join(f"{k} {d:.3g}" for k, d in sorted(worst.items()))
    )
    return result
