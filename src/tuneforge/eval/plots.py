"""PNG plots of a run from its metrics.jsonl: loss vs step and vs tokens, learning rate, throughput, memory; for
GRPO runs also the rewards (each reward, the std band of the total, held-out reward and pass@1), completion
lengths, the policy's statistics (KL, clip fraction, entropy, groups with all-equal rewards) and rollout vs
update time.

matplotlib runs headless (Agg). A plot whose metric was never logged is not drawn, so a CPU run
without memory numbers simply has no memory plot.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def series(records: list[dict], kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of `key` over records of type `kind` that have both; later records win on a repeated x."""
    points: dict[float, float] = {}
    for r in records:
        if r.get("type") == kind and isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float)):
            points[r[x]] = r[key]
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def eval_tokens_axis(records: list[dict]) -> list[dict]:
    """Eval records with `tokens_total` filled in from the train record of the same (or the last earlier) step,
    so eval loss can be drawn against tokens seen; step 0 is 0 tokens."""
    by_step = dict(zip(*series(records, "train", "tokens_total")))
    steps = sorted(by_step)
    out = []
    for r in records:
        if r.get("type") != "eval" or not isinstance(r.get("step"), int):
            continue
        earlier = [s for s in steps if s <= r["step"]]
        out.append({**r, "tokens_total": by_step[earlier[-1]] if earlier else 0})
    return out


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(records: list[dict], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write the run's plots into `out_dir`; returns {name: path} of those drawn, in report order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = eval_tokens_axis(records)
    drawn: dict[str, Path] = {}
    for x, xlabel in (("step", "optimizer step"), ("tokens_total", "tokens seen")):
        tx, ty = series(records, "train", "loss", x)
        ex, ey = series(evals, "eval", "eval_loss", x)
        if not tx and not ex:
            continue
        plt, fig, ax = _figure()
        if tx:
            ax.plot(tx, ty, label="train loss", lw=1.2)
        if ex:
            ax.plot(ex, ey, "o-", label="eval loss", ms=4)
        ax.set(xlabel=xlabel, ylabel="loss (nats/token)", title=f"{title} loss".strip())
        ax.legend()
        name = "loss_vs_step" if x == "step" else "loss_vs_tokens"
        drawn[name] = _save(plt, fig, out_dir / f"{name}.png")
    single = [
        ("lr", [("lr", "learning rate")], "learning rate"),
        ("throughput", [("tokens_per_s", "tokens/s"), ("trained_tokens_per_s", "trained tokens/s")], "tokens/s"),
        ("memory", [("peak_mem_gb", "peak memory")], "GB"),
    ]
    for name, keys, ylabel in single:
        _train_metrics_plot(records, out_dir, title, name, keys, ylabel, drawn)
    drawn.update(_grpo_plots(records, out_dir, title))
    return drawn


def _train_metrics_plot(records, out_dir: Path, title: str, name: str, keys, ylabel: str, drawn: dict) -> None:
    """One PNG of train-record metrics against step (a line per logged key, [(key, label)]); none if none logged."""
    lines = [(label, *series(records, "train", key)) for key, label in keys]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return
    plt, fig, ax = _figure()
    for label, xs, ys in lines:
        ax.plot(xs, ys, label=label, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=f"{title} {name.replace('_', ' ')}".strip())
    if len(lines) > 1:
        ax.legend(fontsize="small")
    drawn[name] = _save(plt, fig, out_dir / f"{name}.png")


GRPO_PLOTS = [  # name, [(metric, label)], y label
    ("completion_length", [("completion_len", "mean"), ("completion_len_max", "max")], "completion tokens"),
    (
        "policy",
        [
            ("kl", "KL to the reference"),
            ("clip_fraction", "clip fraction"),
            ("entropy", "entropy (nats/token)"),
            ("groups_all_equal", "groups with all-equal rewards"),
        ],
        "",
    ),
    ("rollout_time", [("rollout_s", "rollouts"), ("update_s", "updates")], "seconds per step"),
]


def _grpo_plots(records: list[dict], out_dir: Path, title: str) -> dict[str, Path]:
    """The GRPO plots, drawn only for a run that logged rewards."""
    rx, ry = series(records, "train", "reward")
    if not rx:
        return {}
    drawn: dict[str, Path] = {}
    plt, fig, ax = _figure()
    _, std = series(records, "train", "reward_std")
    ax.plot(rx, ry, lw=1.4, color="C0", label="reward (total)")
    if len(std) == len(ry):
        ax.fill_between(rx, [y - s for y, s in zip(ry, std)], [y + s for y, s in zip(ry, std)], color="C0", alpha=0.15)
    names = sorted({k for r in records if r.get("type") == "train" for k in r if k.startswith("rewards/")})
    for i, key in enumerate(k for k in names if not k.endswith("_std")):
        xs, ys = series(records, "train", key)
        ax.plot(xs, ys, lw=1.0, color=f"C{i + 1}", label=key.split("/", 1)[1])
    for key, label, marker in (
        ("eval_reward", "held-out reward (greedy)", "o--"),
        ("eval_pass@1", "held-out pass@1", "s--"),
    ):
        xs, ys = series(records, "eval", key)
        if xs:
            ax.plot(xs, ys, marker, ms=4, label=label)
    ax.set(xlabel="optimizer step", ylabel="reward", title=f"{title} rewards".strip())
    ax.legend(fontsize="small")
    drawn["rewards"] = _save(plt, fig, out_dir / "rewards.png")
    for name, keys, ylabel in GRPO_PLOTS:
        _train_metrics_plot(records, out_dir, title, name, keys, ylabel, drawn)
    return drawn


def plot_loss_overlay(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """One PNG with every run's train loss (lines) and eval loss (markers) against step."""
    plt, fig, ax = _figure()
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        tx, ty = series(records, "train", "loss")
        ex, ey = series(records, "eval", "eval_loss")
        if tx:
            ax.plot(tx, ty, color=color, lw=1.2, label=f"{name} train")
        if ex:
            ax.plot(ex, ey, "o--", color=color, ms=4, label=f"{name} eval")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss by run")
    ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, path)
