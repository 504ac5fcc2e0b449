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
from typing import NamedTuple

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


class Segment(NamedTuple):
    """A run of a row whose positions count up by one: tokens [start, end). A sample starts at position 0 (or at the
    row's start); a segment whose first position p is above 0 continues the prompt of the sample before it: it
    attends to that sample's first p tokens, [prefix_start, prefix_start + p), then causally to itself. That is how a
    preference pair shares its prompt (prompt + chosen, then the prompt's last token again + rejected, positions
    going on from the prompt's): the prompt runs through the model once per pair, not once per completion."""

    start: int
    end: int
    prefix_start: int = 0
    prefix_len: int = 0


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a sequence starts: each row's first token, and wherever the positions do not go on by one (a new
    sample at 0, or a branch off a shared prompt, see Segment)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def segments(position_ids: torch.Tensor) -> list[list[Segment]]:
    """The Segments of each row (see Segment)."""
    out = []
    length = position_ids.shape[-1]
    for row, starts in zip(position_ids, sequence_starts(position_ids)):
        at = starts.nonzero().flatten().tolist()
        first = row[starts].tolist()
        bounds, root, root_len = [], 0, 0
        for s, e, p in zip(at, [*at[1:], length], first):
            if p == 0 or s == 0 or p > root_len:  # a sample of its own (also: a row starting mid-sample)
                root, root_len = s, e - s
                bounds.append(Segment(s, e))
            else:
                bounds.append(Segment(s, e, root, p))
        out.append(bounds)
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
    windowed = bool(window) and max(g.end - g.start + g.prefix_len for row in bounds for g in row) > window
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
        for g in row:
            keys = _with_prefix(key[b : b + 1], g)
            near = None
            if g.prefix_len or (windowed and g.end - g.start > window):
                q_at = torch.arange(g.prefix_len, g.prefix_len + g.end - g.start, device=query.device)
                k_at = torch.arange(keys.shape[2], device=query.device)
                near = q_at[:, None] >= k_at[None, :]  # causal, after the whole prefix
                if windowed:  # within the window (transformers' sliding_window_overlay)
                    near &= q_at[:, None] - k_at[None, :] < window
            parts.append(
                F.scaled_dot_product_attention(
                    query[b : b + 1, :, g.start : g.end],
                    keys,
                    _with_prefix(value[b : b + 1], g),
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


def _with_prefix(t: torch.Tensor, g: Segment) -> torch.Tensor:
    """A (1, heads, length, dim) row's keys or values for segment g: its shared prefix's, then its own."""
    own = t[:, :, g.start : g.end]
    if not g.prefix_len:
        return own
    return torch.cat([t[:, :, g.prefix_start : g.prefix_start + g.prefix_len], own], dim=2)


def _lead(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (1, heads, length, dim) after n rows of zeros along the length."""
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2) if n else t


class PackedFlashCPU(torch.autograd.Function):
    """PyTorch's CPU flash-attention kernel (it takes GQA heads as they are) on each sample's slice, forward and
    backward, written straight into whole-row outputs and gradients. Through autograd, each slice's backward
    would allocate a zero gradient of the whole row and add it up, samples x row length per layer; this is
    7% faster per attention call on the benchmark's lengths, with bit-identical outputs and gradients.

    A segment that continues a shared prefix (Segment.prefix_len = n) attends to the prefix's n keys and then
    causally to its own: the kernel's causal mask is aligned top-left, so its queries go in after n zero queries
    (their outputs are dropped and their output gradients are zero, so they add nothing to any gradient); the
    prefix's keys and values get the segment's gradient added to their own sample's."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale):
        batch, heads, length, dim = query.shape
        out = query.new_empty(batch, length, heads, dim)  # the (batch, seq, heads, dim) transformers expects
        logsumexps = []
        for b, row in enumerate(bounds):
            for g in row:
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    _lead(query[b : b + 1, :, g.start : g.end], g.prefix_len),
                    _with_prefix(key[b : b + 1], g),
                    _with_prefix(value[b : b + 1], g),
                    0.0,
                    True,
                    scale=scale,
                )
                out[b : b + 1, g.start : g.end].copy_(o[:, :, g.prefix_len :].transpose(1, 2))
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
            for g in row:  # a sample's own segment comes before the segments that continue its prefix
                n, own = g.prefix_len, slice(g.start, g.end)
                pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    _lead(grad_out[b : b + 1, own].transpose(1, 2), n),
                    _lead(query[b : b + 1, :, own], n),
                    _with_prefix(key[b : b + 1], g),
                    _with_prefix(value[b : b + 1], g),
                    _lead(out[b : b + 1, own].transpose(1, 2), n),
                    logsumexps[i],
                    0.0,
                    True,
                    scale=ctx.scale,
                )
                grad_q, grad_k, grad_v = (piece.transpose(1, 2) for piece in pieces)  # (1, length, heads, dim)
                grads[0][b : b + 1, own].copy_(grad_q[:, n:])
                for grad, piece in zip(grads[1:], (grad_k, grad_v)):
                    grad[b : b + 1, own].copy_(piece[:, n:])
                    if n:
                        grad[b : b + 1, g.prefix_start : g.prefix_start + n].add_(piece[:, :n])
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
    """Whether some row holds several sequences (its positions restart, or branch off a shared prompt, inside it)."""
    return int(sequence_starts(position_ids).sum()) > position_ids.shape[0]


def runs_per_sample(model) -> bool:
    """Whether `model` (or the model inside its DDP / peft wrappers) runs the per-sample attention above, the one
    that reads shared prompts (Segment) from the position_ids."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return getattr(inner.config, "_attn_implementation", None) == NAME


def check_samples_kept_apart(model_name: str, calls: int) -> None:
    """After a forward pass over rows holding several samples, with `calls` per-sample attention calls counted
    in it: none means the model's attention never received the position_ids and the samples attended to each
    other, so stop the run with what to change."""
    if calls == 0:
        raise RuntimeError(
            f"{model_name}'s attention does not receive position_ids, so samples laid in one row (train.padding_free "
            "or data.packing) would attend to each other; set train.padding_free=false and data.packing=false"
        )
