"""A Llama-family RMSNorm that keeps its output instead of its input for backward.

`w * (x * rsqrt(mean(x^2) + eps))` run by autograd keeps x (the residual stream entering the norm) and the
per-row rsqrt; the norm's output y is kept as well, by the projections that read it (LoRA's `A` needs its input
for its gradient). Both (tokens x hidden) tensors stay alive to the backward, twice per decoder layer. The
gradient can be computed from y instead: with x_hat = x * rstd = y / w,

    dx = rstd * (g - x_hat * mean(g * x_hat)),   g = dy * w;     dw = sum over tokens of dy * x_hat

so `RmsNormKeepingOutput.forward` runs the same operations as the model's forward (the same output to the last
bit) in one autograd function that keeps y (shared with the projections), w and the per-row rstd: on SmolLM2-135M
with LoRA that is 1,152 of the ~8,100 floats a decoder layer keeps per token. The division needs a weight with no
zero entry: a norm whose weight has one runs the model's own forward. Gradients equal autograd's to rounding
(tests/model/test_rms_norm.py).

Used where it applies and nowhere else: training with gradients on, no autocast, fp32 or fp64 inputs, a norm whose
forward is the Llama-family RMSNorm (`hidden_states.pow(2).mean(-1, keepdim=True)`, `torch.rsqrt(variance +
self.variance_epsilon)`, `self.weight * hidden_states.to(input_dtype)`). Not on sharded models.
"""

from __future__ import annotations

import inspect

import torch

LLAMA_RMS_NORM = (
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(y, weight, rstd)
        ctx.input_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        y, weight, rstd = ctx.saved_tensors
        x_hat = (y / weight).to(torch.float32)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).to(torch.float32)
            dot = (g * x_hat).mean(-1, keepdim=True)
            grad_x = g.sub_(x_hat * dot).mul_(rstd).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (dy * x_hat.to(dy.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class RmsNormKeepingOutput(torch.nn.Module):
    """Mixin put in front of a Llama-family RMSNorm class (see use_rms_norm_keeping_output)."""

    def forward(self, hidden_states):
        x = hidden_states
        # (the memory planner runs layers on `meta`: no autocast, and no weight values to check)
        meta = x.device.type == "meta"
        if (
            self.training
            and torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.float64)
            and x.dtype == self.weight.dtype
            and (meta or not torch.is_autocast_enabled(x.device.type))
            and (meta or self._nonzero_weight())
        ):
            return _RmsNorm.apply(x, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)

    def _nonzero_weight(self) -> bool:
        version = self.weight._version, self.weight.data_ptr()
        if getattr(self, "_checked_version", None) != version:  # checked again only after the weight changed
            self._weight_nonzero = bool((self.weight != 0).all())
            self._checked_version = version
        return self._weight_nonzero


_CLASSES: dict[type, type] = {}


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    if not (isinstance(getattr(module, "weight", None), torch.nn.Parameter) and hasattr(module, "variance_epsilon")):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return all(line in source for line in LLAMA_RMS_NORM)


def use_rms_norm_keeping_output(model: torch.nn.Module) -> int:
    """Put RmsNormKeepingOutput in front of every Llama-family RMSNorm's class; returns how many were switched."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, RmsNormKeepingOutput) or not _is_llama_rms_norm(module):
            continue
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"OutputKept{cls.__name__}", (RmsNormKeepingOutput, cls), {})
        module.__class__ = _CLASSES[cls]
        switched += 1
    return switched
