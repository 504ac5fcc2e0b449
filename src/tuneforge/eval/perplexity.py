"""Token-weighted eval loss and perplexity: exp(sum of token NLLs / trained tokens), not a mean of batch means."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tuneforge.data.collate import rows_at
from tuneforge.model.lm_loss import trained_nll_sum, trained_tokens


@torch.no_grad()
def evaluate_loss(
    model, dataset, collate, batch_size: int, device, on_batch: Callable[[int], None] | None = None
) -> dict:
    """eval_loss = sum of token NLLs over every trained position / number of trained positions; eval_ppl = exp of it
    (capped at exp(50)); eval_tokens = that count. `on_batch(n)` is called after each batch of n rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(dataset), batch_size):
        batch = collate(rows_at(dataset, list(range(b, min(b + batch_size, len(dataset))))))
        batch = {k: v.to(device) for k, v in batch.items() if not k.startswith("num_")}
        total += float(trained_nll_sum(model, batch))
        count += trained_tokens(batch["labels"])
        if on_batch is not None:
            on_batch(len(batch["labels"]))
    if was_training:
        model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
