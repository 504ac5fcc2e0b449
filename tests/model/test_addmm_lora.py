import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.model.addmm_lora import AddmmLoraLinear, use_addmm_lora


def tiny_lora(alpha=8, dropout=0.0, **lora):
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
    model = LlamaForCausalLM(cfg).double()
    return get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=alpha, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False, **lora
        ),
    )


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("alpha", [8, 5])  # scaling 2 (a power of two) and 1.25
def test_addmm_lora_gives_peft_loss_and_gradients(alpha, monkeypatch):
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    model = tiny_lora(alpha)
    ref, g_ref = loss_and_grads(model, ids)
    assert use_addmm_lora(model) == 14  # 7 projections x 2 layers
    assert all(type(m) is AddmmLoraLinear for m in model.modules() if isinstance(m, LoraLinear))
    calls = []
    original = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k.get("alpha")) or original(*a, **k))
    got, g_got = loss_and_grads(model, ids)
    monkeypatch.undo()
    assert calls == [alpha / 4] * 14  # the fused path really ran, with scaling = alpha / r
    assert got == pytest.approx(ref, rel=1e-13)
    assert g_got.keys() == g_ref.keys() and len(g_got) == 28
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-12, atol=1e-14)


def test_addmm_lora_hands_everything_else_to_peft():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    model = tiny_lora()
    use_addmm_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._addmm_adapter() == "default"
    with model.disable_adapter():
        assert layer._addmm_adapter() is None
        plain = model(input_ids=ids).logits
    model.merge_adapter()
    assert layer._addmm_adapter() is None
    merged = model(input_ids=ids).logits
    model.unmerge_adapter()
    adapted = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(plain, adapted)
    # saved adapters are peft's own format: the state dict keys do not change
    assert all(
        ".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in model.state_dict() if "lora_" in k
    )


def test_dora_layers_are_left_to_peft():
    model = tiny_lora(use_dora=True)
    use_addmm_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._addmm_adapter() is None  # DoRA is a variant: peft's forward


def test_lora_dropout_still_applies_in_training_only():
    model = tiny_lora(dropout=0.5)
    use_addmm_lora(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(input_ids=ids).logits
    torch.manual_seed(1)
    d = model(input_ids=ids).logits
    assert not torch.allclose(c, d)


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward over one forward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ = model(input_ids=ids, labels=ids).loss
    return sum(kept.values())


def test_mask_dropout_lora_keeps_no_mask_and_gives_the_same_numbers():
    """CPU runs: A(dropout(x)) keeps x and a one-byte flag per element instead of the fp32 mask and dropout(x).
    Same loss and gradients as peft's path with the same masks, the same RNG stream after the step, and far
    fewer bytes kept for backward."""
    from tuneforge.model.dropout import use_mask_dropout

    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    model = tiny_lora(dropout=0.25)
    use_mask_dropout(model)
    model.train()
    torch.manual_seed(7)
    ref, g_ref = loss_and_grads(model, ids)
    after_ref = torch.rand(4)
    torch.manual_seed(7)
    peft_bytes = _saved_bytes(model, ids)
    use_addmm_lora(model)
    torch.manual_seed(7)
    got, g_got = loss_and_grads(model, ids)
    after_got = torch.rand(4)
    assert got == pytest.approx(ref, rel=1e-13)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-12, atol=1e-14)
    assert torch.equal(after_got, after_ref)  # one draw per forward, as before
    torch.manual_seed(7)
    fused_bytes = _saved_bytes(model, ids)
    # per projection peft keeps the fp64 mask and dropout(x): 14 x 2 tensors of (51 tokens x 32 or 48) values; the
    # fused path keeps a byte per element and each distinct input once (4 per layer), most of that saved
    copies = (12 * 2 * 51 * 32 + 2 * 2 * 51 * 48) * 8
    assert peft_bytes - fused_bytes > 0.55 * copies and fused_bytes < 0.65 * peft_bytes
