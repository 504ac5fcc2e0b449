import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.model.dropout import MaskDropout, use_mask_dropout


def test_mask_dropout_drops_at_rate_p_and_scales_the_rest():
    torch.manual_seed(0)
    drop = MaskDropout(0.05)
    assert drop.p == 3277 / 65536 and drop.scale == pytest.approx(1 / (1 - 3277 / 65536))
    x = torch.ones(1000, 1000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - drop.p) < 5 * (drop.p * (1 - drop.p) / 1e6) ** 0.5  # within 5 sigma of p
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(drop.scale) and len(values) == 2
    assert float(y.mean()) == pytest.approx(1.0, abs=2e-3)  # unbiased
    # each of the four 16-bit lanes of a 64-bit draw is its own uniform: no lane drops more than another
    lanes = [(y.view(-1)[i::4] == 0).float().mean().item() for i in range(4)]
    assert max(lanes) - min(lanes) < 0.003


def test_mask_dropout_gradient_is_its_mask_and_eval_is_the_identity():
    torch.manual_seed(1)
    drop = MaskDropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y == 0, 0.0, drop.scale))
    drop.eval()
    assert drop(x) is x
    assert MaskDropout(0.0)(x) is x


def test_mask_dropout_follows_the_torch_seed():
    drop = MaskDropout(0.1)
    torch.manual_seed(7)
    a = drop(torch.ones(100, 100))
    torch.manual_seed(7)
    b = drop(torch.ones(100, 100))
    c = drop(torch.ones(100, 100))
    assert torch.equal(a, b) and not torch.equal(b, c)
    with pytest.raises(ValueError, match="dropout probability"):
        MaskDropout(1.0)


def test_use_mask_dropout_replaces_every_lora_dropout():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    assert use_mask_dropout(model) == 2 * 7
    kinds = {
        type(d).__name__
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
        for d in m.lora_dropout.values()
    }
    assert kinds == {"MaskDropout"}
    model.eval()
    assert all(not d.training for m in model.modules() for d in getattr(m, "lora_dropout", {}).values())
    none = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert use_mask_dropout(none) == 0  # peft uses Identity without dropout


def test_mask_is_exactly_the_threshold_comparison_of_the_drawn_bits():
    drop = MaskDropout(0.05)
    torch.manual_seed(11)
    mask = drop.keep_mask(torch.Size([37, 29]), torch.device("cpu"), torch.float32)
    torch.manual_seed(11)  # the bits: numpy's PCG64DXSM seeded by one draw from torch's generator
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    words = np.random.PCG64DXSM(seed).random_raw((37 * 29 + 3) // 4)
    bits = torch.from_numpy(words.view(np.int16))[: 37 * 29].view(37, 29)
    assert torch.equal(mask, torch.where(bits >= drop.threshold, drop.scale, 0.0))
    assert torch.equal(torch.unique(mask), torch.tensor([0.0, drop.scale], dtype=torch.float32))
