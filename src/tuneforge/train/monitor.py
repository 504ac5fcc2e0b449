"""Metric sinks and progress: metrics.jsonl (always) plus the trackers in log.report_to (train/trackers.py);
a live bar on terminals, plain lines in CI logs, JSON lines (progress: json) for log collectors."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.progress import resolve_progress
from tuneforge.train.trackers import record_metrics


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Monitor:
    """Writes one JSON line per logged step to `<run>/metrics.jsonl` and shows progress."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        every: int,
        progress: str = "auto",
        enabled: bool = True,
        trackers: list | None = None,
    ):
        self.enabled = enabled
        self.trackers = list(trackers or []) if enabled else []
        self.every = every
        self.total = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.perf_counter()
        self._first_step: tuple[int, float] | None = None  # (step, time) of the first step seen, for the ETA
        mode = resolve_progress(progress)
        self.mode = mode if enabled else "none"
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self.lost_records = 0  # metrics.jsonl lines a full disk refused
        self._bar = None
        if self.mode == "bar":
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that died before its next checkpoint)."""
        if self._file is None:
            return
        self._file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if not isinstance(rec.get("step"), int) or rec["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Append a record (a step, an eval, an event) to metrics.jsonl and send its numbers to the trackers."""
        if self._file is None:
            return
        line = json.dumps({**record, "time_s": round(time.perf_counter() - self.start, 3)})
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the run goes on (its checkpoints report their own failures)
            self.lost_records += 1
            if self.lost_records == 1:
                print(
                    f"warning: {self.path} could not be written ({e}); training continues, and the records that "
                    "cannot be written are counted in the end-of-run summary",
                    file=sys.stderr,
                    flush=True,
                )
        if self.mode == "json":
            print(line, file=sys.stderr, flush=True)
        tracked = record_metrics(record) if self.trackers else None
        if tracked is not None:
            for t in self.trackers:
                t.log(*tracked)

    def step(self, step: int, metrics: dict) -> None:
        """Record a finished optimizer step; logs every `every` steps and on the last one."""
        if not self.enabled:
            return
        due = step % self.every == 0 or step == self.total
        if due:
            self.write({"type": "train", "step": step, **metrics})
        status = f"loss {metrics['loss']:.4f}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if "mfu" in metrics:
            status += f"  MFU {100 * metrics['mfu']:.0f}%  mem {metrics.get('peak_mem_gb', 0):.1f}G"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        now = time.perf_counter()
        if self._first_step is None:  # the rate is timed from the first step seen (not the eval before it)
            self._first_step = (step, now)
        if self.mode == "plain" and due:
            first, t0 = self._first_step
            rate = (now - t0) / (step - first) if step > first else now - self.start
            eta = rate * (self.total - step)
            print(f"step {step}/{self.total}  {status}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def status(self, text: str) -> None:
        """Show a passing state (evaluation progress inside training) in the live bar's status field; the bar's
        next step replaces it. Without a bar it does nothing: plain and JSON logs get the eval result instead."""
        if self.enabled and self._bar is not None:
            self._bar.update(self._task, status=text)

    def event(self, text: str) -> None:
        if not self.enabled or self.mode == "none":
            return
        if self.mode == "json":
            print(json.dumps({"type": "event", "text": text}), file=sys.stderr, flush=True)
        elif self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()
        if self._file is not None:
            self._file.close()
            self._file = None
