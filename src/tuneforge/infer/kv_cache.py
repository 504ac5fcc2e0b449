"""KV-cache surgery for continuous batching: left-padded batches merged, finished rows dropped, layouts made
contiguous. Each row's cache is left-padded to the batch's width; the attention mask says which columns are real."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise RuntimeError("continuous batching needs a model with a standard key/value cache (DynamicCache layers)")
    return [(layer.keys, layer.values) for layer in layers]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Two left-padded batches as one: caches and masks left-padded to the longer length, then stacked."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    kv = [
        (
            torch.cat([_left_pad(ka, width, 2), _left_pad(kb, width, 2)]),
            torch.cat([_left_pad(va, width, 2), _left_pad(vb, width, 2)]),
        )
        for (ka, va), (kb, vb) in zip(_kv(cache_a), _kv(cache_b))
    ]
    return DynamicCache(ddp_cache_data=kv), torch.cat([_left_pad(mask_a, width, 1), _left_pad(mask_b, width, 1)])


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows`, and drop the leading columns that are padding in every kept row."""
    mask = mask[rows]
    first = int(mask.any(0).nonzero()[0]) if mask.numel() else 0
    kv = [(k[rows, :, first:].contiguous(), v[rows, :, first:].contiguous()) for k, v in _kv(cache)]
    return DynamicCache(ddp_cache_data=kv), mask[:, first:]


def contiguous(cache: DynamicCache) -> DynamicCache:
    """The cache with contiguous key/value tensors. A prefill leaves them transposed views; a torch.compile'd
    decode step guards on strides, so every cache it sees has one layout (else each layout compiles anew)."""
    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in _kv(cache)])
