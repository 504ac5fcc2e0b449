"""model/swiglu_lora.py: the fused SwiGLU + down projection gives autograd's loss and gradients, keeps two of the
MLP's four intermediate-size activations, and leaves every other case to the model's own forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.model import swiglu_lora
from tuneforge.model.addmm_lora import use_addmm_lora
from tuneforge.model.dropout import use_mask_dropout
from tuneforge.model.swiglu_lora import SwigluMLP, use_swiglu_mlp


def tiny(targets="all-linear", dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=5, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    )
    use_mask_dropout(model)
    use_addmm_lora(model)
    return model


def loss_and_grads(model, ids, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_fused(monkeypatch):
    calls = []
    original = swiglu_lora._SwigluDown.apply
    monkeypatch.setattr(swiglu_lora._SwigluDown, "apply", lambda *a: calls.append(a[4] is not None) or original(*a))
    return calls


@pytest.mark.parametrize(
    "targets,dropout",
    [("all-linear", 0.0), ("all-linear", 0.25), (["q_proj", "v_proj", "gate_proj", "up_proj"], 0.25)],
    ids=["lora-down", "lora-down-dropout", "frozen-down"],
)
def test_fused_mlp_gives_autograds_loss_and_gradients(targets, dropout, monkeypatch):
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    model = tiny(targets, dropout)
    ref, g_ref = loss_and_grads(model, ids)
    assert use_swiglu_mlp(model) == 2
    calls = count_fused(monkeypatch)
    got, g_got = loss_and_grads(model, ids)
    assert calls == [targets == "all-linear"] * 2  # the fused path ran in both layers (with LoRA on down or not)
    assert got == ref  # the same forward operations in the same order
    assert g_got.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-12, atol=1e-14)


def saved_floats(model, ids) -> int:
    """Elements of the distinct tensors the model's forward keeps for backward (parameters and views of them left
    out)."""
    saved = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


def test_fused_mlp_keeps_two_intermediate_tensors_fewer_per_layer():
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    model = tiny(dropout=0.0, dtype=torch.float32)
    before = saved_floats(model, ids)
    use_swiglu_mlp(model)
    after = saved_floats(model, ids)
    # silu(gate) and the product (40 tokens x 48 intermediate) no longer kept, in each of the 2 layers; the
    # rank-4 h = p A^T is kept by the fused function instead of by lora_A's linear (the same size)
    assert before - after == 2 * 2 * 40 * 48


def test_everything_else_runs_the_models_own_forward(monkeypatch):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    model = tiny(dropout=0.1)
    use_swiglu_mlp(model)
    assert use_swiglu_mlp(model) == 0  # already switched
    mlp = model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp, SwigluMLP) and type(mlp).__name__ == "SwigluLlamaMLP"
    calls = count_fused(monkeypatch)
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    with model.disable_adapter():
        model(input_ids=ids)
    assert calls == []  # eval, no grad, adapter off: the model's own forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids[:, :3])
    assert calls == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, evaluated, rtol=0, atol=0)


def test_only_swiglu_mlps_are_switched():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(2, 2)
            self.act_fn = torch.nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class OtherMLP(GeluMLP):
        def __init__(self):
            super().__init__()
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):  # not the Llama pattern
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert use_swiglu_mlp(torch.nn.Sequential(GeluMLP(), OtherMLP())) == 0
