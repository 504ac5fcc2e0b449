"""Logit parity between a trained model (base + adapter, fp32) and its export: prompts, numbers, thresholds.

A check runs the same token rows through both models, one row at a time (no padding), and compares the
logits at every position: the largest absolute difference and how often the argmax (top-1 token) agrees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Thresholds:
    """Pass when max|diff| <= rtol * max(1, max|reference logit|) and top-1 agreement >= min_top1.

    The allowed difference scales with the logits' size (real models reach |logit| ~ 30, tiny ones ~ 1).
    """

    rtol: float
    min_top1: float


# fp32: the merged weights equal W + scale*B@A up to rounding (~1e-7 relative per op); measured on the tiny
#   test models ~1e-7 of the logit scale, so 1e-4 leaves room for deep models and still catches a dropped
#   or mis-scaled adapter (those move logits by percents).
# fp16 / bf16: casting the weights rounds them to 11 / 8 significant bits (relative 2^-11 / 2^-8), which
#   moves logits by ~0.1-1% and flips near-tied argmaxes. These bounds catch gross errors (a wrong shard,
#   untied embeddings, overflow to inf); merge correctness is checked separately, in fp32, before the cast.
THRESHOLDS = {
    "fp32": Thresholds(rtol=1e-4, min_top1=0.999),
    "fp16": Thresholds(rtol=2e-2, min_top1=0.98),
    "bf16": Thresholds(rtol=5e-2, min_top1=0.95),
}

FIXED_PROMPTS = ["The quick brown fox jumps over the lazy dog.", "1, 2, 3, 4, 5, 6, 7, 8,"]
FIXED_CHAT = [{"role": "user", "content": "Reverse the words: red green blue"}]


@dataclass
class ParityCheck:
    """One comparison's numbers. `name` says what was compared: "merge" (in memory, fp32) or "export" (on disk)."""

    name: str
    dtype: str
    max_abs_diff: float
    mean_abs_diff: float
    logit_scale: float
    allowed_max_abs_diff: float
    top1_agreement: float
    min_top1_agreement: float
    positions: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.allowed_max_abs_diff and self.top1_agreement >= self.min_top1_agreement

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.name} ({self.dtype}): max |logit diff| {self.max_abs_diff:.3g} "
            f"(allowed {self.allowed_max_abs_diff:.3g}"
            f" = {THRESHOLDS[self.dtype].rtol:g} x scale {self.logit_scale:.3g}), top-1 agreement "
            f"{self.top1_agreement:.4f} (needed >= {self.min_top1_agreement}) "
            f"over {self.positions} positions: {verdict}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


# ---------------------------------------------------------------------------- prompts
def _encode(item, tokenizer) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer(item)["input_ids"])
    if item and isinstance(item[0], dict):  # chat messages
        ids = tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])
    return [int(t) for t in item]


def pick_prompts(
    run_dir: Path, tokenizer, prompts: list | None = None, n: int = 4, max_tokens: int = 128
) -> tuple[list[list[int]], str]:
    """Token rows for the check and where they came from.

    `prompts` items may be text, chat messages (a list of {"role", "content"}) or token ids. Without them:
    the first `n` rows of `<run>/data/eval`, else `<run>/data/train`, else two fixed strings and a chat.
    Each row is cut to `max_tokens`.
    """
    rows, source = None, "given"
    if prompts:
        rows = [_encode(p, tokenizer) for p in prompts]
    else:
        for split in ("eval", "train"):
            path = Path(run_dir) / "data" / split
            if (path / "dataset_info.json").exists():
                import datasets

                ds = datasets.load_from_disk(str(path))
                rows = [list(r) for r in ds.select(range(min(len(ds), 4 * n)))["input_ids"] if len(r) > 0][:n]
                source = f"data/{split}"
                if rows:
                    break
        if not rows:
            rows, source = [_encode(p, tokenizer) for p in FIXED_PROMPTS], "fixed"
            if tokenizer.chat_template:
                rows.append(_encode(FIXED_CHAT, tokenizer))
    rows = [r[:max_tokens] for r in rows if len(r) > 0]
    if not rows:
        raise ValueError("no prompt has any tokens; give prompts with text in them")
    return rows, source


# ---------------------------------------------------------------------------- logits and comparison
@torch.no_grad()
def prompt_logits(model, rows: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits [len(row), vocab] per row, computed in fp32 whatever dtype the weights are stored in."""
    model.eval()
    out = []
    for row in rows:
        ids = torch.tensor([row], dtype=torch.long, device=model.device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def compare(name: str, reference: list[torch.Tensor], candidate: list[torch.Tensor], dtype: str) -> ParityCheck:
    """Numbers for `candidate` against `reference` logits, judged by the thresholds of `dtype`."""
    th = THRESHOLDS[dtype]
    max_diff, sum_diff, scale, agree, positions = 0.0, 0.0, 0.0, 0, 0
    for r, c in zip(reference, candidate, strict=True):
        diff = (r - c).abs()
        worst = float(diff.max())
        max_diff = math.inf if not math.isfinite(worst) or not math.isfinite(max_diff) else max(max_diff, worst)
        sum_diff += float(diff.sum())
        scale = max(scale, float(r.abs().max()))
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
        positions += r.shape[0]
    return ParityCheck(
        name=name,
        dtype=dtype,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / max(1, sum(r.numel() for r in reference)),
        logit_scale=scale,
        allowed_max_abs_diff=th.rtol * max(1.0, scale),
        top1_agreement=agree / max(1, positions),
        min_top1_agreement=th.min_top1,
        positions=positions,
    )
