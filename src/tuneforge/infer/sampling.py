"""Choosing each row's next token from its logits: greedy, or nucleus sampling at the row's own temperature/top_p;
and, only when a request asks, the log-probabilities of the chosen and the most likely tokens."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling at that row's temperature/top_p."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    t = torch.where(hot, temperature, torch.ones_like(temperature))[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # the first token is always kept
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    return torch.where(hot, order.gather(-1, pick[:, None]).squeeze(-1), greedy)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each row's chosen token, the top `k` log-probabilities, their token ids): log_softmax of the
    model's logits as they are (before temperature and top_p, as OpenAI reports them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device)).squeeze(-1)
    top_values, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen, top_values, top_ids
