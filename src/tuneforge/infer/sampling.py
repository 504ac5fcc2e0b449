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
    first token (in descending probability) whose cumulative kept probability exceeds u times the kept total: its
    sample depends on its logits and its stream only, not on the rows sampled beside it (GRPO's rollouts on
    several processes). The other rows share `generator` (torch.multinomial)."""
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
        below = (cums < u[:, None] * cums[:, -1:]).sum(-1)  # kept tokens whose cumulative mass stays under u
        pick[seeded] = below.clamp(max=logits.shape[-1] - 1)
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
