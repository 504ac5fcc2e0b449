"""Token-normalised causal-LM loss over a whole optimizer step.

The loss of a step is (sum of token NLLs over every micro-batch and rank) / (trained tokens in the
step), not a mean of micro-batch means: a micro-batch with 3 trained tokens must not weigh as much as
one with 300. Each micro-batch therefore backpropagates `nll_sum / step_tokens`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.templates import IGNORE_INDEX


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to the loss: labels shifted by one, not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token negative log-likelihoods over trained positions, in fp32 or better."""
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a padded batch (attention_mask) or a packed one (position_ids restarting per sample)."""
    if "position_ids" in batch:
        # no attention mask and no cache: transformers builds the block-diagonal mask from position_ids
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
