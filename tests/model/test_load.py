import pytest
import torch

from tests.conftest import shared_path
from tuneforge.config.schema import AdapterConfig, ModelConfig, TinyModelConfig
from tuneforge.data.tokenizer import TokenizerLoadError, load_pretrained_tokenizer, train_bpe_tokenizer
from tuneforge.model.adapters import apply_adapter, trainable_report
from tuneforge.model.load import ModelLoadError, choose_attention, load_model, load_pretrained


def test_unreachable_hub_model_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"(?s)could not load model 'no-such-org/no-such-model'.*--local-dir DIR"):
        load_pretrained("no-such-org/no-such-model", torch.float32)
    with pytest.raises(
        TokenizerLoadError, match="(?s)set model.name_or_path \\(or model.tokenizer\\) to that directory"
    ):
        load_pretrained_tokenizer("no-such-org/no-such-model", ModelConfig(name_or_path="no-such-org/no-such-model"))


def test_local_tokenizer_without_pad_gets_eos_as_pad():
    path = str(shared_path("tokenizers/llama2"))
    tok = load_pretrained_tokenizer(path, ModelConfig(name_or_path=path))
    assert tok.pad_token == tok.eos_token == "</s>"


def test_tiny_model_from_sizes_with_trained_tokenizer():
    tok = train_bpe_tokenizer(["apple river stone cloud"] * 20, 300)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    cfg = ModelConfig(init=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1))
    model = load_model(cfg, tok, torch.float32, "sdpa", seed=0)
    assert model.config.vocab_size == len(tok) and model.config.num_key_value_heads == 1
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
    same = load_model(cfg, tok, torch.float32, "sdpa", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))

    lora = apply_adapter(model, AdapterConfig(r=2, alpha=4))
    report = trainable_report(lora)
    # all-linear on 1 layer: q,k,v,o,gate,up,down; r=2 -> 2*(in+out) per module
    h, kv, inter = 32, 16, 128
    expected = 2 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + inter) * 2 + (inter + h))
    assert report["trainable_params"] == expected


def test_attention_choice_and_flash_without_gpu():
    assert choose_attention("auto", "cpu") == "sdpa"
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        choose_attention("flash_attention_2", "cpu")
