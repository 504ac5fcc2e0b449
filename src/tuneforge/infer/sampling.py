"""Choosing each row's next token from its logits: greedy, or nucleus sampling at the row's own temperature/top_p;
and, only when a request asks, the log-probabilities of the chosen and the most likely tokens."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None,
    own: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling at that row's temperature/top_p.
    own: per row, the row's own generator or None. A row with one draws a single uniform u from it and takes the
    first token (in descending probability where its top_p < 1; in vocabulary order where it is 1, which needs no
    sort and samples the same distribution) whose cumulative kept probability exceeds u times the kept total: its
    sample depends on its logits and its stream only, not on the rows sampled beside it (GRPO's rollouts on
    several processes). The other rows share `generator` (torch.multinomial)."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    t = torch.where(hot, temperature, torch.ones_like(temperature))[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    # rows that cut with top_p < 1 sort their probabilities; the others need no sort (a 49k vocabulary's sort was a
    # quarter of a GRPO rollout)
    sorted_p, order = probs, None
    cut = (hot & (top_p < 1)).nonzero().flatten()
    if cut.numel():
        kept, order = probs[cut].sort(dim=-1, descending=True)
        outside = (kept.cumsum(-1) - kept) > top_p[cut, None]  # the first token is always kept
        sorted_p = probs.clone()
        sorted_p[cut] = kept.masked_fill(outside, 0.0)
    seeded = [i for i, g in enumerate(own or []) if g is not None]
    if not seeded:
        pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    else:
        pick = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        own_rows = set(seeded)
        rest = [i for i in range(logits.shape[0]) if i not in own_rows]
        if rest:
            pick[rest] = torch.multinomial(sorted_p[rest], 1, generator=generator).squeeze(-1)
        cums = sorted_p[seeded].cumsum(-1)
        u = torch.stack([torch.rand((), generator=own[i], device=own[i].device) for i in seeded]).to(cums)
        # the first token whose cumulative mass passes u (never a token of probability 0)
        below = (cums <= u[:, None] * cums[:, -1:]).sum(-1)
        pick[seeded] = below.clamp(max=logits.shape[-1] - 1)
    if order is not None:
        pick[cut] = order.gather(-1, pick[cut, None]).squeeze(-1)
    return torch.where(hot, pick, greedy)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each row's chosen token, the top `k` log-probabilities, their token ids): log_softmax of the
    model's logits as they are (before temperature and top_p, as OpenAI reports them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device)).squeeze(-1)
    top_values, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen, top_values, top_ids
