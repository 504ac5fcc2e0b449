"""Failures a run survives but must never keep quiet: a checkpoint that could not be written, a final/ that could
not be written, and the end-of-run tally of what was skipped. Shown whatever log.progress is (`none` included)."""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.train.disk_space import free_bytes, gb


def alert(monitor, text: str) -> None:
    """A line every progress mode shows: through the monitor (above the live bar, a plain line, a JSON event), or
    straight to stderr where the monitor prints nothing (log.progress: none, or a process other than the main one)."""
    if monitor is not None and monitor.enabled and monitor.mode != "none":
        monitor.event(text)
    else:
        print(text, file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    """`Type: first line of the message` (torch's enforce failures run to many lines)."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:300]}"


def save_failed_message(step: int, e: BaseException, ckpt_root: Path, latest: Path | None, failures: int) -> str:
    kept = (
        f"the previous checkpoint {latest} is intact and is where a resume would start"
        if latest
        else "no checkpoint has been written yet: a crash now would lose every step so far"
    )
    try:
        free = f"{gb(free_bytes(ckpt_root))} free there"
    except OSError:
        free = "free space unknown"
    return (
        f"warning: checkpoint at step {step} could not be written ({error_text(e)}); {kept}. Training goes on "
        f"({failures} failed save{'s' if failures != 1 else ''} so far). Free disk space or fix permissions on "
        f"{ckpt_root} ({free})"
    )


def final_failed_message(run_dir: Path, e: BaseException, latest: Path | None, steps: int) -> str:
    if latest is None:
        where = (
            f"no checkpoint was written either, so the {steps} steps trained are lost: free space on "
            f"{run_dir} and start again"
        )
    else:
        where = (
            f"the last good checkpoint is {latest}: free space on {run_dir} and run the same `tuneforge train` "
            f"command again (it resumes from there and writes final/), or pass --resume {latest}"
        )
    return f"the final weights could not be written to {run_dir / 'final'} ({error_text(e)}); {where}"


def end_of_run_warnings(summary: dict, run_dir: Path) -> list[str]:
    """One line for each kind of failure the run went on after: failed checkpoint saves, skipped steps and rows."""
    lines = []
    if n := summary.get("failed_checkpoint_saves"):
        last = summary.get("last_checkpoint")
        lines.append(
            f'warning: {n} checkpoint save{"s" if n != 1 else ""} failed ("checkpoint_failed" in '
            f"{run_dir / 'metrics.jsonl'}); the last good checkpoint is {last or 'none'}"
        )
    if n := summary.get("lost_metric_records"):
        lines.append(
            f"warning: {n} record{'s' if n != 1 else ''} could not be written to {run_dir / 'metrics.jsonl'} "
            "(disk full?): the loss curve and the report miss them"
        )
    if n := summary.get("bad_steps"):
        lines.append(
            f"warning: {n} step{'s' if n != 1 else ''} skipped: a non-finite loss or gradient, no weight "
            f'update ("bad_step" in {run_dir / "metrics.jsonl"})'
        )
    if n := summary.get("skipped_rows"):
        lines.append(
            f"warning: {n} data row{'s' if n != 1 else ''} skipped as invalid (data.skip_invalid; the "
            f"reasons are in {run_dir / 'data' / 'data_report.json'})"
        )
    return lines
