"""Run `tuneforge train` in this process and SIGKILL it at a precise point (used by test_resume.py).

python crash_run.py micro N CONFIG [overrides]        kill during the N-th micro-batch (mid-accumulation)
python crash_run.py save STAGE N CONFIG [overrides]   kill in the N-th checkpoint save, at STAGE
                                                      (start | weights | optimizer | manifest | rename | latest)
"""

import os
import signal
import sys

import tuneforge.train.checkpoint as checkpoint
import tuneforge.train.loop as loop
from tuneforge.cli import main
from tuneforge.train.grpo_step import GrpoObjective
from tuneforge.train.objective_step import PairObjective


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_micro_batch(n: int) -> None:
    """SIGKILL in the n-th micro-batch's loss: sft's (loop.trained_nll_sum), a pair objective's or GRPO's (loss_sum)."""
    calls = {"n": 0}

    def counted(real):
        def call(*args, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                die()
            return real(*args, **kw)

        return call

    loop.trained_nll_sum = counted(loop.trained_nll_sum)
    PairObjective.loss_sum = counted(PairObjective.loss_sum)
    GrpoObjective.loss_sum = counted(GrpoObjective.loss_sum)


def kill_in_save(stage: str, n: int) -> None:
    saves = {"n": 0}

    def reached(s: str) -> None:
        if s == "start":
            saves["n"] += 1
        if s == stage and saves["n"] == n:
            die()

    checkpoint._reached = reached


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "micro":
        kill_in_micro_batch(int(rest[0]))
        rest = rest[1:]
    elif mode == "save":
        kill_in_save(rest[0], int(rest[1]))
        rest = rest[2:]
    sys.exit(main(["train", *rest]))
