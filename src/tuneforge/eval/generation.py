"""Batched greedy/sampled generation from chat messages, with the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from tuneforge.data.masks import prompt_ids


@torch.no_grad()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    stop_ids: list[int] | None = None,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Continue each conversation with an assistant turn; returns the generated texts (specials removed).
    `on_batch(n)` is called after each batch of n conversations (progress display)."""
    device = next(model.parameters()).device
    stops = stop_ids or [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for b in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, tokenizer.chat_template, c) for c in conversations[b : b + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every row continues at the same position
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            **sampling,
        )
        for row in out[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        if on_batch is not None:
            on_batch(len(prompts))
    if was_training:
        model.train()
    return outputs
