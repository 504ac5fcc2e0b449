"""Terminal progress shared by every stage: a live rich bar on terminals, plain lines in CI logs, JSON lines
(log.progress: json) for log collectors, or nothing. No stage imports another stage's console code."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator


def resolve_progress(progress: str) -> str:
    """auto -> a live bar when stderr is a terminal, plain lines otherwise (CI logs, pipes)."""
    return progress if progress != "auto" else ("bar" if sys.stderr.isatty() else "plain")


class TaskProgress:
    """Progress of a counted task outside the training loop (eval batches, generation), in the log.progress style:
    a rich bar on a terminal, a plain line every ~10% in logs, JSON lines, or nothing."""

    def __init__(self, description: str, total: int, progress: str = "auto"):
        self.description, self.total, self.done = description, total, 0
        self.mode = resolve_progress(progress)
        self.start = time.perf_counter()
        self._next_line = 0.0
        self._bar = None
        if self.mode == "bar" and total > 0:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn(description),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        fraction = self.done / max(self.total, 1)
        if self.mode in ("plain", "json") and (fraction >= self._next_line or self.done >= self.total):
            self._next_line = fraction + 0.1
            elapsed = time.perf_counter() - self.start
            if self.mode == "json":
                print(
                    json.dumps(
                        {
                            "type": "progress",
                            "task": self.description,
                            "done": self.done,
                            "total": self.total,
                            "elapsed_s": round(elapsed, 3),
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            else:
                eta = elapsed / max(self.done, 1) * (self.total - self.done)
                print(f"{self.description}: {self.done}/{self.total}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def stage_status(description: str, progress: str = "auto") -> Iterator[Callable[[str], None]]:
    """A spinner with elapsed time while a stage without step counts runs (data preparation); yields the `log`
    function the stage should print through, so its lines appear above the spinner (or as JSON lines)."""
    mode = resolve_progress(progress)
    if mode == "json":
        yield lambda text: print(
            json.dumps({"type": "event", "stage": description, "text": text}), file=sys.stderr, flush=True
        )
        return
    if mode != "bar":
        yield print
        return
    from rich.console import Console

    console = Console()
    with console.status(f"{description}...") as status:
        yield lambda text: status.console.print(text, highlight=False, markup=False)
