"""Forgetting, measured: perplexity on general text the user names (`eval.general_text`), before and after.

Fine-tuning on a narrow task can cost a model some of what it knew. The same text scored by the model
before and after training shows it: `general_ppl` rising means forgetting. The text is read from its
start, tokenised without special tokens, cut into windows of `window` tokens (the last partial window
kept), and scored with every position after the first of each window predicted: a token-weighted loss,
like `eval_loss`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.model.lm_loss import trained_nll_sum

CHARS_PER_TOKEN_BOUND = 16  # read at most this many characters per wanted token (never tokenise a whole corpus)


class GeneralTextError(TuneforgeError, RuntimeError):
    """eval.general_text cannot be scored; the message names the file and the fix."""


def general_text_windows(path: str | Path, tokenizer, max_tokens: int, window: int) -> list[list[int]]:
    """The first `max_tokens` tokens of the file, in windows of `window` (at least 2 tokens each)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            text = fh.read(max_tokens * CHARS_PER_TOKEN_BOUND)
    except FileNotFoundError:
        raise GeneralTextError(
            f"eval.general_text: {p} does not exist; name a UTF-8 text file (e.g. "
            "wikitext2_valid.txt) or remove the key"
        ) from None
    except UnicodeDecodeError as e:
        raise GeneralTextError(
            f"eval.general_text: {p} is not UTF-8 text (byte {e.start}); convert it or name another file"
        ) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise GeneralTextError(f"eval.general_text: {p} holds no text to score (fewer than 2 tokens)")
    return windows


@torch.no_grad()
def general_text_perplexity(model, windows: list[list[int]], batch_size: int, pad_id: int) -> dict:
    """general_loss (token-weighted NLL over the windows), general_ppl = exp of it, general_tokens scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = labels[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        total += float(trained_nll_sum(model, batch))
        count += sum(len(w) - 1 for w in chunk)
    if was_training:
        model.train()
    loss = total / count
    return {"general_loss": loss, "general_ppl": math.exp(min(loss, 50.0)), "general_tokens": count}


def forgetting_line(before: dict, after: dict, path: str | None) -> str | None:
    """'forgetting check: perplexity on FILE 24.90 -> 25.40 (+2.0%) over N tokens', or None without both scores."""
    if "general_ppl" not in before or "general_ppl" not in after:
        return None
    b, a = before["general_ppl"], after["general_ppl"]
    name = Path(path).name if path else "eval.general_text"
    return (
        f"forgetting check: perplexity on {name} {b:.2f} -> {a:.2f} ({100 * (a / b - 1):+.1f}%) over "
        f"{int(after.get('general_tokens', 0)):,} tokens"
    )
