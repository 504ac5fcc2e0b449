"""model/rms_norm.py: the RMSNorm that keeps its output gives the model's own output bit for bit and autograd's
gradients to rounding, keeps one (tokens x hidden) tensor fewer per norm, and leaves other cases to the model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tuneforge.model.rms_norm import RmsNormKeepingOutput, use_rms_norm_keeping_output


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-6)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_output_equal_and_gradients_equal_autograds(dtype, tol, train_weight):
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g, dtype=dtype))
    norm.weight.requires_grad_(train_weight)
    x = (3 * torch.randn(2, 7, 24, generator=g, dtype=dtype)).requires_grad_()
    upstream = torch.randn(2, 7, 24, generator=g, dtype=dtype)
    leaves = [x, norm.weight] if train_weight else [x]
    ref = norm(x)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)
    assert use_rms_norm_keeping_output(norm) == 1 and isinstance(norm, RmsNormKeepingOutput)
    out = norm(x)
    assert out.grad_fn is not None and "RmsNorm" in type(out.grad_fn).__name__  # the fused function ran
    assert torch.equal(out, ref)  # the same operations forward
    for got, want in zip(torch.autograd.grad((out * upstream).sum(), leaves), ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_keeps_the_output_not_the_input_in_a_model():
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
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():  # as with LoRA: frozen norms, every projection reads its input back
        p.requires_grad_(name.endswith("proj.weight"))
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_floats():
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        return sum(saved.values()), loss

    before, ref_loss = saved_floats()
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    assert use_rms_norm_keeping_output(model) == 5  # 2 per layer and the final norm
    after, loss = saved_floats()
    loss.backward()
    assert loss.item() == ref_loss.item()
    for p, want in zip([p for p in model.parameters() if p.requires_grad], ref_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)
    # three norms no longer keep their 40 x 32 input: layer 0's input norm reads the embeddings (which need no
    # gradient: nothing was kept), and the final norm's output is read by a frozen LM head (it keeps its output
    # where autograd kept its input)
    assert before - after == 3 * 40 * 32


def test_a_zero_weight_eval_no_grad_and_other_norms_run_the_models_forward():
    norm = LlamaRMSNorm(8)
    use_rms_norm_keeping_output(norm)
    x = torch.randn(3, 8, requires_grad=True)
    assert "RmsNorm" in type(norm(x).grad_fn).__name__
    with torch.no_grad():
        norm.weight[3] = 0.0  # x_hat = y / w would divide by zero: the model's own forward
    assert "RmsNorm" not in type(norm(x).grad_fn).__name__
    with torch.no_grad():
        norm.weight[3] = 2.0
    assert "RmsNorm" in type(norm(x).grad_fn).__name__
    norm.eval()
    assert "RmsNorm" not in type(norm(x).grad_fn).__name__
    assert use_rms_norm_keeping_output(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))) == 0
