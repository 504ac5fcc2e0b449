"""Per-sample attention for packed rows with PyTorch SDPA: cost proportional to each sample's length.

A packed row (several samples one after another, `position_ids` restarting at 0 for each) must not let
a sample attend to another. transformers does that with SDPA by building a block-diagonal 4-D mask from
the position_ids; an explicit mask keeps SDPA off its fused causal kernels (on a CPU it takes about twice
as long as the fused kernel over the same samples, and it grows with the square of the whole row).
flash-attention's varlen path does it on CUDA when installed; everywhere else, `tuneforge_sdpa` runs
SDPA with `is_causal=True` on each sample's slice of the row (the same numbers, see
tests/train/test_loss.py; on a CPU it calls the flash kernel directly, `PackedFlashCPU`) and falls back to
plain SDPA for ordinary padded batches (evaluation, generation), so one model serves both.

Registered under the name `tuneforge_sdpa` in transformers' attention and mask interfaces; the loop
switches a model to it with `use_packed_sdpa(model)` when it trains on packed or padding-free batches.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tuneforge_sdpa"


class _Seen:
    """How many attention calls split a row by its position_ids (the loop checks the model passes them)."""

    packed_calls = 0
    rows_by_position = False  # inside rows_by_position(): samples delimited by position_ids, no attention_mask


@contextlib.contextmanager
def rows_by_position():
    """Within: the model's rows hold samples that their position_ids delimit (padding-free or packed batches, no
    attention_mask). The per-sample attention splits them itself, so transformers' (row x row) block mask, which it
    would build on every forward and never use, is not built: quadratic in the row (1 GiB of bools for a
    32k-token pass) and ~1% of a step on the training benchmark."""
    before = _Seen.rows_by_position
    _Seen.rows_by_position = True
    try:
        yield
    finally:
        _Seen.rows_by_position = before


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] per row: a new sample starts wherever position_ids is 0."""
    out = []
    length = position_ids.shape[-1]
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        out.append(list(zip(starts, [*starts[1:], length])))
    return out


def packed_sdpa_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """(batch, heads, seq, dim) in -> (batch, seq, heads, dim) out, as transformers' sdpa_attention_forward.
    A layer with a sliding window (kwargs["sliding_window"]) keeps it within each sample."""
    length = query.shape[2]
    if position_ids is None or length != position_ids.shape[-1] or length == 1 or key.shape[2] != length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = segments(position_ids.expand(query.shape[0], -1))
    window = kwargs.get("sliding_window")
    windowed = bool(window) and max(e - s for row in bounds for s, e in row) > window  # some sample outgrows it
    if all(len(b) == 1 for b in bounds) and (attention_mask is not None or not windowed):
        # one sample per row: SDPA with the mask, or causal where rows_by_position() left the mask out
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _Seen.packed_calls += 1
    if query.device.type == "cpu" and dropout == 0.0 and not windowed:
        return PackedFlashCPU.apply(query, key, value, bounds, scaling), None
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row in enumerate(bounds):
        parts = []
        for s, e in row:
            near = None
            if windowed and e - s > window:  # causal within the window (transformers' sliding_window_overlay)
                i = torch.arange(e - s, device=query.device)
                near = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            parts.append(
                F.scaled_dot_product_attention(
                    query[b : b + 1, :, s:e],
                    key[b : b + 1, :, s:e],
                    value[b : b + 1, :, s:e],
                    attn_mask=near,
                    dropout_p=dropout,
                    is_causal=near is None,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            )
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


class PackedFlashCPU(torch.autograd.Function):
    """PyTorch's CPU flash-attention kernel (it takes GQA heads as they are) on each sample's slice, forward and
    backward, written straight into whole-row outputs and gradients. Through autograd, each slice's backward
    would allocate a zero gradient of the whole row and add it up, samples x row length per layer; this is
    7% faster per attention call on the benchmark's lengths, with bit-identical outputs and gradients."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale):
        batch, heads, length, dim = query.shape
        out = query.new_empty(batch, length, heads, dim)  # the (batch, seq, heads, dim) transformers expects
        logsumexps = []
        for b, row in enumerate(bounds):
            for s, e in row:
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], 0.0, True, scale=scale
                )
                out[b : b + 1, s:e].copy_(o.transpose(1, 2))
                logsumexps.append(lse)
        ctx.save_for_backward(query, key, value, out, *logsumexps)
        ctx.bounds, ctx.scale = bounds, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *logsumexps = ctx.saved_tensors
        grads = [t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]) for t in (query, key, value)]
        i = 0
        for b, row in enumerate(ctx.bounds):
            for s, e in row:
                pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_out[b : b + 1, s:e].transpose(1, 2),
                    query[b : b + 1, :, s:e],
                    key[b : b + 1, :, s:e],
                    value[b : b + 1, :, s:e],
                    out[b : b + 1, s:e].transpose(1, 2),
                    logsumexps[i],
                    0.0,
                    True,
                    scale=ctx.scale,
                )
                for grad, piece in zip(grads, pieces):
                    grad[b : b + 1, s:e].copy_(piece.transpose(1, 2))
                i += 1
        return *(grad.transpose(1, 2) for grad in grads), None, None


def packed_mask(*args, **kwargs):
    """The SDPA mask, except inside rows_by_position(): the attention above derives the samples from position_ids."""
    if _Seen.rows_by_position and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, packed_mask)


def use_packed_sdpa(model) -> bool:
    """Switch a model that runs SDPA to the per-sample version; False when it runs something else."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        return False
    inner.set_attn_implementation(NAME)
    return True


def packed_calls() -> int:
    return _Seen.packed_calls


def samples_share_rows(position_ids) -> bool:
    """Whether some row holds several samples (its position_ids restart inside it)."""
    return int((position_ids == 0).sum()) > position_ids.shape[0]


def check_samples_kept_apart(model_name: str, calls: int) -> None:
    """After a forward pass over rows holding several samples, with `calls` per-sample attention calls counted
    in it: none means the model's attention never received the position_ids and the samples attended to each
    other, so stop the run with what to change."""
    if calls == 0:
        raise RuntimeError(
            f"{model_name}'s attention does not receive position_ids, so samples laid in one row (train.padding_free "
            "or data.packing) would attend to each other; set train.padding_free=false and data.packing=false"
        )
