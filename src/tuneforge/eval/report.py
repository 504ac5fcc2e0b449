"""The run report: <run>/report.md and a self-contained <run>/report.html, plus <run>/plots/*.png.

Written at the end of `tuneforge train` and by `tuneforge report RUN_DIR`. It reads only files the run
directory already holds (config.yaml, metrics.jsonl, run_summary.json, eval.json, data/data_report.json,
final/tuneforge.json), so it can be rebuilt at any time. The report is built once as a list of blocks
and rendered twice: Markdown (images linked) and HTML (images embedded as base64, one file to share).
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.eval.general_text import forgetting_line
from tuneforge.eval.plots import plot_run, read_metrics
from tuneforge.eval.runner import COUNTS  # sizes of an eval, not scores to compare

PLOT_TITLES = {
    "loss_vs_step": "Loss vs optimizer step",
    "loss_vs_tokens": "Loss vs tokens seen",
    "lr": "Learning rate",
    "throughput": "Throughput",
    "memory": "Peak memory",
    "rewards": "GRPO rewards",
    "completion_length": "GRPO completion length",
    "policy": "GRPO policy: KL, clipping, entropy, all-equal groups",
    "rollout_time": "GRPO rollout and update time",
}


@dataclass
class Block:
    kind: str  # h2 | p | table | img | pre
    text: str = ""
    rows: list | None = None  # table: first row is the header
    path: Path | None = None  # img


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def fmt(v) -> str:
    """Numbers the way a person reads them: 4 significant digits, thousands separators for counts."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def _model_line(cfg: dict) -> str:
    model = cfg.get("model", {})
    if model.get("name_or_path"):
        return str(model["name_or_path"])
    init = model.get("init") or {}
    return f"new {init.get('architecture', '?')} (hidden {init.get('hidden_size')}, {init.get('num_layers')} layers)"


def _summary_rows(cfg: dict, summary: dict, info: dict, data: dict) -> list[list[str]]:
    adapter = cfg.get("adapter", {})
    kind = adapter.get("type", "?") + (
        f" (r={adapter['r']})" if adapter.get("type") != "full" and "r" in adapter else ""
    )
    prep_s = sum((data.get("seconds") or {}).values())
    rows = [
        ["model", _model_line(cfg)],
        ["fine-tuning", kind],
        ["precision", fmt(info.get("precision"))],
        ["trainable parameters", f"{fmt(info.get('trainable_params'))} of {fmt(info.get('total_params'))}"],
        ["steps", f"{fmt(summary.get('steps'))}" + (" (stopped early)" if summary.get("stopped_early") else "")],
        ["train loss (first -> last)", f"{fmt(summary.get('first_loss'))} -> {fmt(summary.get('last_loss'))}"],
        ["eval loss / perplexity", f"{fmt(summary.get('eval_loss'))} / {fmt(summary.get('eval_ppl'))}"],
        ["best step", fmt(summary.get("best_step"))],
        ["wall time (training)", f"{summary['wall_s']:.1f} s" if "wall_s" in summary else "-"],
        ["data preparation", f"{prep_s:.1f} s" if prep_s else "-"],
        ["tokens (trained)", f"{fmt(summary.get('tokens'))} ({fmt(summary.get('trained_tokens'))})"],
        ["tokens/s (whole run)", fmt(summary.get("tokens_per_s"))],
    ]
    return [["", ""], *rows]


def _metric_table(left: dict, right: dict, names: tuple[str, str]) -> list[list[str]]:
    keys = [
        k
        for k, v in right.items()
        if k in left and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNTS
    ]
    rows = [["metric", names[0], names[1], "delta"]]
    rows += [[k, fmt(left[k]), fmt(right[k]), f"{right[k] - left[k]:+.4g}"] for k in keys]
    return rows


def _data_rows(data: dict) -> list[list[str]]:
    rows = [["", "train", "eval"]]
    tr, ev = data.get("train") or {}, data.get("eval") or {}
    for key, label in (
        ("rows", "rows"),
        ("tokens", "tokens"),
        ("trained_tokens", "trained tokens"),
        ("trained_fraction", "trained fraction"),
        ("truncated_rows", "truncated rows"),
    ):
        rows.append([label, fmt(tr.get(key)), fmt(ev.get(key))])
    for side in ("min", "median", "p95", "max"):
        rows.append(
            [f"length {side}", fmt((tr.get("length") or {}).get(side)), fmt((ev.get("length") or {}).get(side))]
        )
    return rows


def build_blocks(run_dir: Path) -> list[Block]:
    import yaml

    cfg_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
    cfg = yaml.safe_load(cfg_text) or {}
    summary, evals = _json(run_dir / "run_summary.json"), _json(run_dir / "eval.json")
    data, info = _json(run_dir / "data" / "data_report.json"), _json(run_dir / "final" / "tuneforge.json")
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = plot_run(records, run_dir / "plots", run_dir.resolve().name)

    b = [
        Block("p", f"Run directory `{run_dir}`, report written {time.strftime('%Y-%m-%d %H:%M:%S')}."),
        Block("h2", "Summary"),
        Block("table", rows=_summary_rows(cfg, summary, info, data)),
        Block("h2", "Training curves"),
    ]
    b += [Block("img", PLOT_TITLES.get(name, name), path=path) for name, path in plots.items()] or [
        Block("p", "No metrics were logged (metrics.jsonl is missing or empty).")
    ]

    b.append(Block("h2", "Evaluation"))
    if evals.get("base"):
        b += [
            Block("p", "`tuneforge eval --base`: base model and fine-tuned model on the same held-out rows."),
            Block("table", rows=_metric_table(evals["base"], evals["tuned"], ("base", "tuned"))),
        ]
    elif evals.get("tuned"):
        b += [
            Block("p", "`tuneforge eval` on the held-out rows:"),
            Block("table", rows=[["metric", "tuned"], *[[k, fmt(v)] for k, v in evals["tuned"].items()]]),
        ]
    if summary.get("before") and summary.get("after"):
        b += [
            Block("p", "During training: held-out set before the first step and after the last."),
            Block("table", rows=_metric_table(summary["before"], summary["after"], ("before", "after"))),
        ]
        forgetting = forgetting_line(summary["before"], summary["after"], (cfg.get("eval") or {}).get("general_text"))
        if forgetting:
            b.append(
                Block(
                    "p",
                    forgetting[0].upper() + forgetting[1:] + " (general_ppl above; a rise means the model "
                    "lost some of what it knew).",
                )
            )
    if not (evals or summary.get("before")):
        b.append(
            Block(
                "p",
                "No evaluation recorded (no held-out set, or eval.at_start off); run `tuneforge eval RUN_DIR --base`.",
            )
        )

    samples = (evals.get("samples") or {}).get("tuned") or summary.get("samples") or []
    if samples:
        b += [
            Block("h2", "Sample generations"),
            Block(
                "table",
                rows=[
                    ["prompt", "expected", "generated"],
                    *[[s["prompt"], s["reference"], s["generated"]] for s in samples[:10]],
                ],
            ),
        ]

    if data:
        b += [Block("h2", "Data"), Block("table", rows=_data_rows(data))]
        dedup, decon = data.get("dedup") or {}, data.get("decontamination") or {}
        b.append(
            Block(
                "p",
                f"{fmt(data.get('rows_read'))} rows read; {fmt(dedup.get('exact_removed', 0))} exact and "
                f"{fmt(dedup.get('near_removed', 0))} near duplicates removed; {fmt(decon.get('removed', 0))} "
                f"rows removed as overlapping the eval set; chat template: {data.get('chat_template', '-')}, "
                f"trained on: {data.get('train_on', '-')}.",
            )
        )
        if (run_dir / "data" / "lengths.png").exists():
            b.append(Block("img", "Training sample lengths", path=run_dir / "data" / "lengths.png"))
    if cfg_text:
        b += [Block("h2", "Config"), Block("pre", cfg_text)]
    return b


# ---------------------------------------------------------------------------- renderers
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(blocks: list[Block], title: str, base: Path) -> str:
    out = [f"# {title}", ""]
    for blk in blocks:
        if blk.kind == "h2":
            out += [f"## {blk.text}", ""]
        elif blk.kind == "p":
            out += [blk.text, ""]
        elif blk.kind == "table":
            head, *body = blk.rows
            out.append("| " + " | ".join(_md_cell(c) for c in head) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            out.append("")
        elif blk.kind == "img":
            out += [f"![{blk.text}]({blk.path.resolve().relative_to(base.resolve()).as_posix()})", ""]
        elif blk.kind == "pre":
            out += ["```yaml", blk.text.rstrip("\n"), "```", ""]
    return "\n".join(out)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
    "text-align:left;vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:.8rem;overflow:auto}figure{margin:1rem 0}"
)


def render_html(blocks: list[Block], title: str) -> str:
    """One HTML file with every image inlined as a data: URI, so it can be mailed or attached as is."""
    esc = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
        f"</head><body><h1>{esc(title)}</h1>"
    ]
    for blk in blocks:
        if blk.kind == "h2":
            out.append(f"<h2>{esc(blk.text)}</h2>")
        elif blk.kind == "p":
            out.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(blk.text)) + "</p>")
        elif blk.kind == "table":
            head, *body = blk.rows
            out.append("<table><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
        elif blk.kind == "img":
            data = base64.b64encode(blk.path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{esc(blk.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(blk.text)}</figcaption></figure>"
            )
        elif blk.kind == "pre":
            out.append(f"<pre>{esc(blk.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write <run>/plots/*.png, <run>/report.md and <run>/report.html; returns (md, html)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    blocks = build_blocks(run_dir)
    title = f"Run report: {run_dir.resolve().name}"
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(render_markdown(blocks, title, run_dir), encoding="utf-8")
    page.write_text(render_html(blocks, title), encoding="utf-8")
    return md, page


def write_report_quietly(run_dir: Path, say=print) -> None:
    """The run report after training; a report problem is a warning, never a failed run."""
    import sys

    try:
        md, page = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the weights are saved; the report can be rebuilt with `tuneforge report`
        print(
            f"warning: the run report was not written ({type(e).__name__}: {e}); "
            f"retry with: tuneforge report {run_dir}",
            file=sys.stderr,
        )
        return
    say(f"report: {md} and {page.name} (plots in {run_dir / 'plots'})")
