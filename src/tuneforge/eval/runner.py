"""`tuneforge eval RUN_DIR [--base]`: the fine-tuned model (and its base) on the run's held-out set.

Both models see the same rows, the same tokenizer and chat template, and the same generation settings,
so the side-by-side table compares like with like. Results go to <run>/eval.json, which the run
report reads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.config.schema import EvalConfig, RunConfig
from tuneforge.data.collate import PaddedCollator
from tuneforge.errors import TuneforgeError
from tuneforge.eval.generation import generate
from tuneforge.eval.perplexity import evaluate_loss
from tuneforge.eval.tasks import task_metrics
from tuneforge.eval.tool_call_eval import tool_call_prompts, tool_call_scores
from tuneforge.progress import TaskProgress

COUNTS = (
    "eval_tokens",
    "eval_pairs",
    "eval_rows",
    "generated_rows",
    "general_tokens",
    "tool_call_rows",
)  # sizes of the eval, not scores: printed above the table, not in it


class EvalError(TuneforgeError, RuntimeError):
    """The run cannot be evaluated as asked; the message says why and what to do."""


@dataclass
class ModelEval:
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # {"prompt", "reference", "generated"}


def held_out_chats(dataset, n: int | None = None) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references): each row's conversation up to its last assistant turn, and that turn's text."""
    prompts, refs = [], []
    for row in dataset.select_columns(["messages"]):
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        prompts.append(msgs[:last])
        refs.append(msgs[last]["content"])
        if n is not None and len(prompts) == n:
            break
    return prompts, refs


def evaluate_model(
    model,
    tokenizer,
    eval_rows,
    cfg: EvalConfig,
    stop_ids: list[int] | None,
    rows: int | None = None,
    progress: str = "auto",
    label: str = "eval",
) -> ModelEval:
    """Token-weighted loss/perplexity over every held-out row, then task metrics on `rows` generations
    (all rows when None)."""
    device = next(model.parameters()).device
    bar = TaskProgress(f"{label}: loss", len(eval_rows), progress)
    try:
        metrics = evaluate_loss(
            model, eval_rows, PaddedCollator(tokenizer.pad_token_id), cfg.batch_size, device, on_batch=bar.advance
        )
    finally:
        bar.close()
    prompts, refs = held_out_chats(eval_rows, rows)
    bar = TaskProgress(f"{label}: generate", len(prompts), progress)
    try:
        tasks, samples = task_eval(model, tokenizer, eval_rows, cfg, stop_ids, rows, on_batch=bar.advance)
    finally:
        bar.close()
    return ModelEval({**metrics, **tasks}, samples)


def task_eval(
    model, tokenizer, eval_rows, cfg: EvalConfig, stop_ids: list[int] | None, rows: int | None, on_batch=None
) -> tuple[dict, list[dict]]:
    """Generate an answer for `rows` held-out conversations (all when None) and score them against the
    references: ({"generated_rows", exact match, ROUGE-L, ...}, [{"prompt", "reference", "generated"}])."""
    prompts, refs = held_out_chats(eval_rows, rows)
    if not prompts:
        return {}, []

    def answer(chats: list, on_batch=None) -> list[str]:
        return generate(
            model,
            tokenizer,
            chats,
            cfg.max_new_tokens,
            stop_ids,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            on_batch=on_batch,
        )

    preds = answer(prompts, on_batch)
    samples = [{"prompt": p[-1]["content"], "reference": r, "generated": g} for p, r, g in zip(prompts, refs, preds)]
    metrics = {"generated_rows": len(preds), **task_metrics(preds, refs)}
    calling, calls, offered = tool_call_prompts(eval_rows, rows)  # held-out turns that call tools, if any
    if calling:
        metrics.update(tool_call_scores(answer(calling), calls, offered))
    return metrics, samples


@contextlib.contextmanager
def base_model(model, cfg: RunConfig, tokenizer) -> Iterator[torch.nn.Module]:
    """The model before fine-tuning: the same weights with the adapter switched off, or (full fine-tuning)
    the original checkpoint, or the same random init rebuilt from model.init and train.seed."""
    if hasattr(model, "disable_adapter"):  # a peft model: base weights are inside, untouched
        with model.disable_adapter():
            yield model
        return
    from tuneforge.model.load import load_model

    try:
        base = load_model(cfg.model, tokenizer, torch.float32, "sdpa", seed=cfg.train.seed)
    except Exception as e:
        raise EvalError(
            f"--base: could not load the base model {cfg.model.name_or_path!r} ({e}); "
            "make it reachable at model.name_or_path in the run's config.yaml"
        ) from None
    base.eval()
    yield base.to(next(model.parameters()).device)


def comparison_table(base: dict | None, tuned: dict, names: tuple[str, str] = ("base", "tuned")) -> str:
    """metric | base | tuned | delta, for the numeric metrics both share (only `tuned` without a base); `names`
    heads the two columns (before / after for a training run)."""
    keys = [k for k, v in tuned.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNTS]
    if base is None:
        width = max(len(k) for k in keys) + 2 if keys else 8
        lines = [f"{'metric':<{width}}{names[1]:>12}"]
        lines += [f"{k:<{width}}{tuned[k]:>12.4f}" for k in keys]
        return "\n".join(lines)
    keys = [k for k in keys if k in base]
    width = max(len(k) for k in keys) + 2 if keys else 8
    lines = [f"{'metric':<{width}}{names[0]:>12}{names[1]:>12}{'delta':>12}"]
    for k in keys:
        lines.append(f"{k:<{width}}{base[k]:>12.4f}{tuned[k]:>12.4f}{tuned[k] - base[k]:>+12.4f}")
    return "\n".join(lines)


def write_eval_json(run_dir: str | Path, tuned: ModelEval, base: ModelEval | None, settings: dict) -> Path:
    out = Path(run_dir) / "eval.json"
    payload = {
        "settings": settings,
        "tuned": tuned.metrics,
        "base": base.metrics if base else None,
        "samples": {"tuned": tuned.samples, "base": base.samples if base else []},
    }
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    return out
