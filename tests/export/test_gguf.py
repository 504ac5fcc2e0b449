"""`tuneforge export --gguf`: a GGUF file for llama.cpp / Ollama, read back and compared with its source
(tensors after undoing the Q/K permutation, metadata, tokenizer); corruption and unsupported models fail loudly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'tuneforge[gguf]'")

from tuneforge.cli import main
from tuneforge.export import ExportError, GGUFCheckError, GGUFExportError, export_run, gguf_file
from tuneforge.export.gguf_file import SafetensorsSource, check_gguf, export_gguf, permute_qk, plan_gguf, write_gguf

from ..conftest import shared_path


def _bpe_tokenizer():
    from tuneforge.data.synthetic import generate
    from tuneforge.data.tokenizer import train_bpe_tokenizer

    rows = generate("reverse_words", 100, seed=0)
    return train_bpe_tokenizer([f"{r['instruction']}\n\n{r['input']} {r['output']}" for r in rows], 300)


def tiny_dir(root: Path, model_type: str = "llama", tokenizer=None, **overrides) -> Path:
    """A 2-layer model directory (random weights, grouped-query attention) with a real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer or _bpe_tokenizer()
    sizes = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), eos_token_id=tok.eos_token_id, **{**sizes, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _read(path: Path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _values(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


# ---------------------------------------------------------------------------- a trained run, end to end
def test_lora_run_exports_a_gguf_that_holds_the_merged_weights_and_tokenizer(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--out", str(out), "--dtype", "fp32", "--gguf"]) == 0
    path = out / "lora-F16.gguf"
    assert path.exists() and not list(out.glob(".*tmp*"))
    assert f"GGUF {path}" in capsys.readouterr().out

    reader, tensors = _read(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "lora"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.context_length")) == (2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 4)
    tied = json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    # per layer: 7 matrices + 2 norms; embeddings, final norm, and lm_head unless tied to the embeddings
    assert len(tensors) == 2 * 9 + 2 + (not tied) and ("output.weight" in tensors) == (not tied)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    tok = AutoTokenizer.from_pretrained(out)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id == 3  # <|im_end|>, the run's stop token
    assert field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field("tokenizer.chat_template") == tok.chat_template and "<|im_start|>" in tok.chat_template
    assert len(field("tokenizer.ggml.merges")) > 0

    # the merged q_proj (base + adapter), permuted for llama.cpp's RoPE, in f16
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    q = merged["model.layers.0.self_attn.q_proj.weight"]
    want = permute_qk(q.half().float().numpy(), 4)
    assert np.array_equal(_values(tensors["blk.0.attn_q.weight"]), want)
    assert not np.array_equal(want, q.half().float().numpy())  # the permutation moved rows


def test_a_gguf_that_reads_back_wrong_fails_and_leaves_no_file(lora_run, tmp_path, monkeypatch, capsys):
    real = gguf_file._encoded

    def encoded_then_corrupted(spec, source):
        data = real(spec, source)
        if spec.name == "blk.1.ffn_down.weight":  # a bad cast / a wrong tensor on the way to disk
            data = data.copy()
            data.reshape(-1)[:4] = 0
        return data

    monkeypatch.setattr(gguf_file, "_encoded", encoded_then_corrupted)
    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--out", str(out), "--gguf", "--gguf-type", "f32"]) == 1
    err = capsys.readouterr().err
    assert "GGUF round-trip check of lora-F32.gguf failed (1 problems): blk.1.ffn_down.weight: max |diff|" in err
    assert (out / "parity.json").exists()  # the Hugging Face export itself passed and stays
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*tmp*"))


# ---------------------------------------------------------------------------- model directories
@pytest.mark.parametrize(
    "model_type,overrides,gguf_type,arch",
    [
        ("llama", {"attention_bias": True}, "q8_0", "llama"),  # biases permuted with their rows too
        ("mistral", {"sliding_window": None}, "bf16", "llama"),
        ("qwen2", {"tie_word_embeddings": True}, "f32", "qwen2"),  # q/k/v biases, no output.weight
    ],
)
def test_architectures_and_types_round_trip(tmp_path, model_type, overrides, gguf_type, arch):
    model = tiny_dir(tmp_path / model_type, model_type, **overrides)
    result = export_gguf(model, tmp_path / "m.gguf", gguf_type, log=lambda _: None)
    assert (result.arch, result.gguf_type, result.vocab_size) == (arch, gguf_type, 300)
    _, tensors = _read(result.path)
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == gguf_type.upper()
    if gguf_type == "q8_0":  # quantized: within one step of each 32-value block, and really rounded
        assert 0 < result.max_abs_diff["Q8_0"] < 0.01
    assert result.max_abs_diff.get("F32", 0.0) == 0.0 and result.max_abs_diff.get("BF16", 0.0) == 0.0
    assert ("output.weight" in tensors) == (model_type != "qwen2")
    assert ("blk.1.attn_k.bias" in tensors) == (model_type != "mistral")


def test_a_corrupted_tensor_in_the_file_is_detected(tmp_path):
    model = tiny_dir(tmp_path / "m")
    source = SafetensorsSource(model)
    plan = plan_gguf(model, "f32", source, "m")
    path = tmp_path / "m.gguf"
    write_gguf(plan, source, path)
    assert check_gguf(path, plan, source, model) == {"F32": 0.0}
    reader, tensors = _read(path)
    offset = int(tensors["blk.1.attn_k.weight"].data_offset)
    del reader, tensors  # close the memory map before writing
    with open(path, "r+b") as f:  # one float of one tensor, changed on disk
        f.seek(offset + 4 * 10)
        f.write(np.float32(7.0).tobytes())
    with pytest.raises(GGUFCheckError, match=r"blk\.1\.attn_k\.weight: max \|diff\| 7"):
        check_gguf(path, plan, source, model)


def test_a_missing_qk_permutation_is_caught_by_the_check(tmp_path, monkeypatch):
    model = tiny_dir(tmp_path / "m")
    monkeypatch.setattr(gguf_file, "permute_qk", lambda w, heads: w)  # the classic converter bug
    with pytest.raises(GGUFCheckError) as err:
        export_gguf(model, tmp_path / "m.gguf", "f32", log=lambda _: None)
    msg = str(err.value)
    assert "(4 problems)" in msg and all(f"blk.{i}.attn_{x}.weight" in msg for i in (0, 1) for x in "qk")
    assert not (tmp_path / "m.gguf").exists()


def test_the_permutation_turns_rotate_half_rope_into_llama_cpp_pair_rope():
    """Attention scores with Hugging Face's RoPE (dims i and i + d/2 rotate together) on the original Q/K rows
    equal those with llama.cpp's LLAMA RoPE (dims 2i and 2i+1 rotate together) on the permuted rows."""
    torch.manual_seed(0)
    heads, kv_heads, d, hidden, n = 4, 2, 16, 32, 7
    wq, wk, x = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(n, hidden)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (n, d/2)
    cos, sin = angle.cos(), angle.sin()

    def rope_hf(v):  # v: (n, heads, d)
        a, b = v[..., : d // 2], v[..., d // 2 :]
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rope_pairs(v):
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).flatten(-2)

    def scores(q, k, rope):
        q, k = rope((x @ q.T).view(n, heads, d)), rope((x @ k.T).view(n, kv_heads, d))
        return torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(heads // kv_heads, 1))

    permuted_q = torch.from_numpy(permute_qk(wq.numpy(), heads))
    permuted_k = torch.from_numpy(permute_qk(wk.numpy(), kv_heads))
    torch.testing.assert_close(scores(permuted_q, permuted_k, rope_pairs), scores(wq, wk, rope_hf))
    assert not torch.allclose(scores(wq, wk, rope_pairs), scores(wq, wk, rope_hf))  # unpermuted: wrong


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_dir(tmp_path / "m", rope_parameters=rope)
    result = export_gguf(model, tmp_path / "m.gguf", "f16", log=lambda _: None)
    reader, tensors = _read(result.path)
    freqs = _values(tensors["rope_freqs.weight"])
    assert freqs.shape == (8,) and freqs[0] == 1.0 and freqs[-1] == 8.0  # fast dims kept, slow dims scaled 8x
    assert math.isclose(reader.fields["llama.rope.freq_base"].contents(), 500000.0)


@pytest.mark.parametrize(
    "model_type,overrides", [("llama", {"attention_bias": True}), ("qwen2", {"tie_word_embeddings": True})]
)
def test_llama_cpp_reads_the_file_like_transformers(tmp_path, model_type, overrides):
    """Optional (needs llama-cpp-python, which compiles llama.cpp): llama.cpp's logits and tokenization of the
    GGUF file equal transformers' on the source directory."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional check)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_dir(tmp_path / "m", model_type, **overrides)
    path = export_gguf(model_dir, tmp_path / "m.gguf", "f32", log=lambda _: None).path
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["Reverse the order of these words.\n\nrocket candle island", "it's 1234 naïve    spaces, 東京 🚀"]
    ids = tok(texts[0])["input_ids"]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())  # measured 1.6e-4 at scale 0.65
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]


# ---------------------------------------------------------------------------- what is refused, and how
def test_unsupported_architecture_is_refused_before_any_work(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tmp_path / "gpt2"
    cfg = AutoConfig.for_model("gpt2", vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    _bpe_tokenizer().save_pretrained(model_dir)
    want = (
        "GGUF export supports llama (LlamaForCausalLM), mistral (MistralForCausalLM) and qwen2 (Qwen2ForCausalLM); "
        "this model is 'gpt2' (GPT2LMHeadModel)"
    )
    with pytest.raises(GGUFExportError, match=want.replace("(", r"\(").replace(")", r"\)")):
        export_gguf(model_dir, tmp_path / "x.gguf", log=lambda _: None)
    assert main(["export", str(model_dir), "--out", str(tmp_path / "out"), "--gguf"]) == 2
    assert want in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.gguf").exists()


def test_an_unknown_pre_tokenizer_is_refused_with_the_known_ones(tmp_path):
    model = tiny_dir(tmp_path / "m")
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(
        GGUFExportError,
        match=r"tokenizer.json: its pre-tokenizer \{\"type\": \"Whitespace\"\} is not "
        r"one this exporter can name for llama.cpp \(known: GPT-2 byte-level, Llama-3",
    ):
        export_gguf(model, tmp_path / "m.gguf", log=lambda _: None)


def test_missing_gguf_package_and_bad_type_are_input_errors(lora_run, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"--gguf-type 'q4_k' is not one of f32, f16, bf16, q8_0"):
        export_run(lora_run, tmp_path / "a", gguf="q4_k", log=lambda _: None)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(
        ExportError,
        match=r"--gguf needs the gguf package \(not installed\): pip install "
        r"'tuneforge\[gguf\]'",
    ):
        export_run(lora_run, tmp_path / "b", gguf="f16", log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- real tokenizers (../shared/data)
def _real_tokenizer_export(tmp_path: Path, name: str, model_type: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_path(f"tokenizers/{name}"))
    model = tiny_dir(
        tmp_path / name, model_type, tokenizer=tok, hidden_size=32, intermediate_size=32, tie_word_embeddings=True
    )
    return tok, export_gguf(model, tmp_path / "m.gguf", "f16", log=lambda _: None)


def test_sentencepiece_style_tokenizer_round_trips_with_bytes_unk_and_scores(tmp_path):
    tok, result = _real_tokenizer_export(tmp_path, "llama2", "llama")
    reader, _ = _read(result.path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert result.tokenizer == "llama (default)" and result.vocab_size == len(tok) == 32000
    types, scores = field("tokenizer.ggml.token_type"), field("tokenizer.ggml.scores")
    assert types.count(int(gguf.TokenType.BYTE)) == 256 and types[0] == int(gguf.TokenType.UNKNOWN)
    assert types[1] == types[2] == int(gguf.TokenType.CONTROL)  # <s>, </s>
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_space_prefix") is True
    # merges are ranked by score: the first merge's piece scores -1, later ones lower
    first_merge = json.loads((tmp_path / "llama2" / "tokenizer.json").read_text())["model"]["merges"][0]
    piece = "".join(first_merge) if isinstance(first_merge, list) else first_merge.replace(" ", "")
    assert scores[tok.convert_tokens_to_ids(piece)] == -1.0 and min(scores) < -30000


@pytest.mark.integration  # gguf's reader takes ~25 s over 128k tokens and 280k merges
def test_llama3_tokenizer_round_trips_as_llama_bpe(tmp_path):
    from tuneforge.export.gguf_tokenizer import read_vocab

    tok, result = _real_tokenizer_export(tmp_path, "llama3", "llama")  # the round trip checked every token
    assert result.tokenizer == "gpt2 (llama-bpe)" and result.vocab_size == len(tok) == 128256
    vocab = read_vocab(tmp_path / "llama3", len(tok), [])
    assert vocab.add_bos and vocab.special_ids["bos"] == 128000 and len(vocab.merges) > 200_000
    assert vocab.chat_template == tok.chat_template and "<|start_header_id|>" in vocab.chat_template


@pytest.mark.parametrize("name,pre", [("gpt2", "gpt-2"), ("llama3", "llama-bpe"), ("qwen2.5", "qwen2")])
def test_byte_level_pre_tokenizers_get_llama_cpp_names(name, pre):
    from tuneforge.export.gguf_tokenizer import _pre_name

    path = shared_path(f"tokenizers/{name}/tokenizer.json")
    assert _pre_name(json.loads(path.read_text(encoding="utf-8")), path) == pre
