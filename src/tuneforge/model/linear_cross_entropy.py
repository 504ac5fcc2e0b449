"""LM head + cross-entropy in row chunks, with the gradients computed in the same pass.

`F.cross_entropy(F.linear(h, W), t)` keeps (rows x vocab) logits, writes the same size again for
log-softmax, and fills and reads a third such tensor in backward: with a 32k vocabulary and 75% of the
tokens trained, those passes over memory took as long as the LM head's matmuls on the CPU measured here.
This computes, for a chunk of rows at a time, the logits, their softmax, the loss (-log of the target's
probability, or logsumexp - logit where that probability is below TINY) and the gradient softmax - onehot,
and folds it straight into the gradients of the hidden states (and of the weight and bias when they
train). No full-size logits exist at any time; backward only scales the stored gradients by the incoming
one (the loss is a sum, so its gradient is linear in that scalar).

The matmuls run under whatever autocast is active (bf16 on a GPU), and the softmax in fp32, as in the
unfused path. Without autocast on a CPU, every chunk's logits are written into one workspace that lives
as long as the process, and the softmax overwrites them in place: glibc serves allocations from 32 MB up
with fresh mmapped pages, so a fresh 65 MB chunk paid its page faults every time and ran 30% slower than
the same chunk in a kept buffer. Chunks are as large as CHUNK_ELEMENTS allows (64 MB of fp32 logits),
because every chunk streams the whole head weight (32 MB at 32000 x 256) from memory twice: 2552 rows
(256 hidden, 32000 vocab) took 615-660 ms forward + backward in fresh 229-row chunks, ~560 ms in 512-row
chunks in the workspace and ~530 in 1024-row ones. Never fewer than MIN_CHUNK_ROWS rows: a
(rows x 256) @ (256 x 32000) matmul ran here at 62 GFLOP/s with 32 rows and 131 with 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 16 * 2**20
MIN_CHUNK_ROWS = 128
TINY = 1e-30  # smallest target probability whose log is taken from the softmax itself


_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # CPU logits buffer, kept between calls


def chunk_rows(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


def _workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    key = (str(device), dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)  # free the old one before taking the larger
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):  # noqa: D102 - see linear_cross_entropy_sum
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        exact = torch.promote_types(compute, torch.float32)  # softmax and sums: fp32, or fp64 for fp64 inputs
        total = torch.zeros((), dtype=exact, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=exact) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=exact) if want_b else None
        w = weight.to(compute)  # cast once, not per chunk (a no-op without autocast)
        b = bias.to(compute) if bias is not None else None
        in_place = hidden.device.type == "cpu" and compute == exact  # see the module docstring
        if in_place:
            buf = _workspace(hidden.device, exact, min(rows, hidden.shape[0]) * weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows].to(compute), targets[start : start + rows, None]
            if in_place:
                p = buf[: h.shape[0] * weight.shape[0]].view(h.shape[0], weight.shape[0])
                if b is None:
                    torch.mm(h, w.t(), out=p)
                else:
                    torch.addmm(b, h, w.t(), out=p)
                torch.ops.aten._softmax.out(p, -1, False, out=p)  # one pass fewer than log_softmax + exp
            else:
                p = torch.softmax(F.linear(h, w, b).to(exact), dim=-1)
            p_t = p.gather(1, t)
            nll = -torch.log(p_t)
            far = p_t < TINY  # p_t underflowed or lost digits (target logit ~70+ below the top): exactly, from logits
            if far.any():
                rows_far = far[:, 0]
                logits = F.linear(h[rows_far], w, b).to(exact)  # recomputed: only such rows, and rarely
                nll[rows_far] = torch.logsumexp(logits, -1, keepdim=True) - logits.gather(1, t[rows_far])
            total += nll.sum()
            if not (want_h or want_w or want_b):
                continue
            p.scatter_(1, t, p_t - 1.0)  # softmax - onehot = d(-log p_t) / d logits
            g = p.to(compute)
            if want_h and in_place:  # no autocast here: one dtype throughout, written straight into place
                torch.mm(g, w, out=grad_h[start : start + rows])
            elif want_h:
                grad_h[start : start + rows] = g @ w
            if want_w and in_place:
                grad_w.addmm_(g.t(), h)
            elif want_w:
                grad_w += g.t() @ h
            if want_b:
                grad_b += p.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - the loss is a sum: its gradients scale with grad_out
        return (
            *(None if g is None else (g * grad_out).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)),
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int | None = None,
) -> torch.Tensor:
    """sum_i -log softmax(hidden_i @ weight.T + bias)[targets_i], in fp32, differentiable in hidden, weight
    and bias; equal to `F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`
    (fp64 throughout for fp64 inputs)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (rows, dim) and targets (rows,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows or chunk_rows(weight.shape[0]))
