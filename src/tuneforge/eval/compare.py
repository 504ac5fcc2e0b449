"""`tuneforge compare RUN_A RUN_B ...`: final metrics side by side and one PNG with every run's loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.eval.plots import plot_loss_overlay, read_metrics, series
from tuneforge.eval.report import fmt

# columns of the table, in order; a column no run has is left out
COLUMNS = [
    "steps",
    "train_loss",
    "eval_loss",
    "eval_ppl",
    "exact_match",
    "exact_match_normalized",
    "rouge_l",
    "chrf",
    "bleu",
    "tokens",
    "tokens_per_s",
    "wall_s",
]


def final_metrics(run_dir: str | Path) -> dict:
    """The last value of each metric: run_summary.json first, then the last train/eval records of metrics.jsonl
    (a run still training, or one that stopped, has no summary yet)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out: dict = {}
    steps, losses = series(records, "train", "loss")
    if steps:
        out.update(steps=int(steps[-1]), train_loss=losses[-1])
    for key in ("tokens_total", "tokens_per_s"):
        _, ys = series(records, "train", key)
        if ys:
            out["tokens" if key == "tokens_total" else key] = ys[-1]
    for r in records:  # later evals overwrite earlier ones, key by key (task metrics come in a separate record)
        if r.get("type") == "eval":
            out.update({k: v for k, v in r.items() if k not in ("type", "step", "time_s", "eval_tokens")})
    summary_file = run_dir / "run_summary.json"
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        out.update({k: s[k] for k in ("steps", "tokens", "tokens_per_s", "wall_s") if k in s})
        out.update({k: v for k, v in (s.get("after") or {}).items() if k != "eval_tokens"})
        if s.get("last_loss") is not None:
            out["train_loss"] = s["last_loss"]
    return out


def compare_runs(run_dirs: list[str | Path], plot_path: str | Path) -> tuple[str, Path]:
    """(table text, overlay PNG path). Raises FileNotFoundError naming a run with no metrics.jsonl."""
    runs: dict[str, list[dict]] = {}
    finals: dict[str, dict] = {}
    for d in map(Path, run_dirs):
        if not (d / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{d}: no metrics.jsonl; is this a tuneforge run directory?")
        name = d.resolve().name
        while name in runs:  # two runs with the same folder name: tell them apart
            name = f"{d.resolve().parent.name}/{name}"
        runs[name], finals[name] = read_metrics(d / "metrics.jsonl"), final_metrics(d)
    cols = [c for c in COLUMNS if any(c in f for f in finals.values())]
    width = max(len(n) for n in runs) + 2
    widths = [max(12, len(c) + 2) for c in cols]
    lines = [f"{'run':<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    for name, f in finals.items():
        lines.append(f"{name:<{width}}" + "".join(f"{fmt(f.get(c)):>{w}}" for c, w in zip(cols, widths)))
    return "\n".join(lines), plot_loss_overlay(runs, plot_path)
