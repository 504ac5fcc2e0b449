"""A SwiGLU MLP's `down(silu(gate(x)) * up(x))` keeping only gate(x) and up(x) for backward.

Run as written, autograd keeps four (tokens x intermediate) tensors per layer for a LoRA-adapted MLP: gate(x)
for SiLU's backward, silu(gate(x)) and up(x) for the product's, and the product itself as the input of the
down projection's LoRA (its `A` needs it for its gradient). They are the largest activations of a decoder layer:
on SmolLM2-135M (hidden 576, intermediate 1536) 6,144 of the ~11,200 floats a LoRA layer keeps per token.
`SwigluMLP.forward` computes the product and the down projection (its frozen base weight, and its LoRA
`A`/`B` with the same MaskDropout mask as `AddmmLoraLinear` would draw) in one autograd function that keeps
gate(x), up(x) and the one-byte dropout flags, and recomputes silu(gate) * up in backward: two elementwise
passes over a tensor the backward reads anyway, against 2 of the 4 tensors kept (27% of the layer's
activations on SmolLM2). The loss is the same to the last bit (the same operations in the same order
forward); the gradients equal autograd's to rounding (tests/model/test_swiglu_lora.py, fp64, to 1e-12).

Used where it applies and nowhere else: training with gradients on, no autocast, an MLP whose forward is the
Llama-family `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU, and a down projection that is either a
frozen plain Linear or a fusable `AddmmLoraLinear` (one plain adapter, its base frozen). Everything else runs the
model's own forward. Like AddmmLoraLinear, not on sharded models (FSDP2 / ZeRO-3 gather weights in module hooks).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from tuneforge.model.addmm_lora import AddmmLoraLinear
from tuneforge.model.dropout import MaskDropout

SWIGLU_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class _SwigluDown(torch.autograd.Function):
    """down(silu(g) * u) = p W^T (+ bias) + scaling * ((p * mask) A^T) B^T, keeping g, u, the kept flags and the
    rank-sized h = (p * mask) A^T."""

    @staticmethod
    def forward(ctx, g, u, weight, bias, lora_a, lora_b, scaling, dropout):
        p = F.silu(g) * u
        out = F.linear(p, weight, bias)
        h = kept = None
        if lora_a is not None:
            if dropout is not None:
                mask = dropout.keep_mask(p.shape, p.device, p.dtype)
                h = F.linear(p * mask, lora_a)
                kept = mask.to(torch.bool)
                ctx.scale = dropout.scale
            else:
                h = F.linear(p, lora_a)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.t(), alpha=scaling)
            out = flat.view(out.shape)
        ctx.scaling = scaling
        ctx.save_for_backward(g, u, weight, lora_a, lora_b, h, kept)
        return out

    @staticmethod
    def backward(ctx, grad):
        g, u, weight, lora_a, lora_b, h, kept = ctx.saved_tensors
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_p = grad @ weight
        grad_a = grad_b = None
        if lora_a is not None:
            grad2 = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[5]:
                grad_b = (grad2.t() @ h.reshape(-1, h.shape[-1])).mul_(ctx.scaling)
            grad_h = (grad2 @ lora_b).mul_(ctx.scaling)
            mask = (
                kept.to(torch.float32).mul_(ctx.scale).to(g.dtype) if kept is not None else None
            )  # keep_mask's values
            if ctx.needs_input_grad[4]:
                p = silu * u
                if mask is not None:
                    p = p.mul_(mask)
                grad_a = grad_h.t() @ p.reshape(-1, p.shape[-1])
            lora_grad = (grad_h @ lora_a).view(grad_p.shape)
            grad_p += lora_grad.mul_(mask) if mask is not None else lora_grad
        grad_u = grad_p * silu if ctx.needs_input_grad[1] else None
        grad_g = None
        if ctx.needs_input_grad[0]:  # d silu / dg = sig (1 + g (1 - sig))
            grad_g = grad_p.mul_(u).mul_(sig * (1 + g * (1 - sig)))
        return grad_g, grad_u, None, None, grad_a, grad_b, None, None


def _down_parts(down: torch.nn.Module, dtype: torch.dtype):
    """(weight, bias, lora_A, lora_B, scaling, MaskDropout or None) of a down projection the fused function can
    compute, or None."""
    if type(down) is torch.nn.Linear:
        if down.weight.requires_grad or (down.bias is not None and down.bias.requires_grad):
            return None
        return down.weight, down.bias, None, None, 1.0, None
    if not isinstance(down, AddmmLoraLinear):
        return None
    name = down._addmm_adapter()
    base = down.get_base_layer()
    if name is None or type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    lora_a, lora_b = down.lora_A[name], down.lora_B[name]
    if lora_a.bias is not None or not (dtype == lora_a.weight.dtype == lora_b.weight.dtype == base.weight.dtype):
        return None
    dropout = down.lora_dropout[name]
    if isinstance(dropout, MaskDropout):
        dropout = dropout if dropout.training and dropout.p > 0 else None
    elif isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0):
        dropout = None
    else:
        return None
    return base.weight, base.bias, lora_a.weight, lora_b.weight, down.scaling[name], dropout


class SwigluMLP(torch.nn.Module):
    """Mixin put in front of a Llama-family MLP class (see use_swiglu_mlp)."""

    def forward(self, x):
        # (the memory planner runs layers on `meta`, where autocast cannot be asked about and is never on)
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if self.training and torch.is_grad_enabled() and not autocast:
            g, u = self.gate_proj(x), self.up_proj(x)
            parts = _down_parts(self.down_proj, g.dtype) if g.dtype == u.dtype else None
            if parts is not None:
                return _SwigluDown.apply(g, u, *parts)
            return self.down_proj(self.act_fn(g) * u)
        return super().forward(x)


_CLASSES: dict[type, type] = {}


def _is_swiglu(module: torch.nn.Module) -> bool:
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    act = module.act_fn
    if not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return SWIGLU_FORWARD in source.replace("\n", " ")


def use_swiglu_mlp(model: torch.nn.Module) -> int:
    """Put SwigluMLP in front of every Llama-family SwiGLU MLP's class; returns how many MLPs were switched."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, SwigluMLP) or not _is_swiglu(module):
            continue
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Swiglu{cls.__name__}", (SwigluMLP, cls), {})
        module.__class__ = _CLASSES[cls]
        switched += 1
    return switched
