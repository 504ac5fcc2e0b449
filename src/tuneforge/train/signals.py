"""Graceful stops: SIGTERM (pre-emption) and SIGINT (Ctrl-C) finish the current step, then checkpoint.

A second Ctrl-C while the step finishes interrupts at once (the previous checkpoint is kept).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from tuneforge.errors import TuneforgeError


class TrainingStopped(TuneforgeError, RuntimeError):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None, previous: Path | None = None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = (
            f"checkpoint {checkpoint} written"
            if checkpoint
            else "the checkpoint could not be written, "
            + (f"so a resume starts from the last good one, {previous}" if previous else "and none was before")
        )
        super().__init__(
            f"stopped by {signame} after step {step}; {where}. Run the same `tuneforge train` command again to resume."
        )

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signame, signal.SIGTERM))


class BadStepsError(TuneforgeError, RuntimeError):
    """Too many steps with a non-finite loss or gradient."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `requested` (the signal's name) instead of killing."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = name
        print(
            f"\n{name} received: finishing this step and writing a checkpoint (Ctrl-C again to abort now)", flush=True
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
