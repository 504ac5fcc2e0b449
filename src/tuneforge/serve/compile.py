"""`serve --compile`: torch.compile the decode step of the served model, and compile it before the first request.

Decoding runs one forward per generated token over the whole batch; it is where per-step overhead (Python,
kernel launches) shows, and where torch.compile's fused kernels pay. Prefills, one per request and bound by
the prompt's matrix multiplies, stay eager. The compiled forward uses dynamic shapes, so batch sizes and cache
lengths reuse one graph; PyTorch still specialises sizes of 1, so serving meets a few graphs. `warm_up`
compiles the common ones (one row, several rows) at startup: failures surface there as a `CompileError` that
says what to do, not as the first client's 500, and no client waits for the compiler. Rarer shapes (a
one-token prompt's first step) compile on first use.

Numbers: greedy outputs equal eager ones (tests/serve/test_serve_options.py). benchmarks/serve_compile.py on
the shared, busy 2-core CPU of this project, 2-layer Llama of hidden size 256: 1.4-1.7x the decode steps/s of
eager at batch 1, 1.15-1.3x at batch 8. Compiling took 6-70 s (cold caches and load make the spread).
"""

from __future__ import annotations

import threading
import time

from tuneforge.errors import TuneforgeError
from tuneforge.infer.engine import Engine, Event, SamplingParams

RECOMPILE_LIMIT = 16  # graphs per compiled function: the shapes above, with room (torch's default is 8)
WARM_UP_TIMEOUT_S = 1800.0


class CompileError(TuneforgeError, RuntimeError):
    """torch.compile is unavailable or failed on this machine; the message says what to do."""


def compile_decode(engine: Engine) -> None:
    """Make `engine` run its decode steps through torch.compile(model, dynamic=True); the weights stay shared
    and prefills stay eager. Compilation itself happens on first use: call `warm_up` next."""
    import torch
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise CompileError(
            f"--compile: torch.compile is not supported with this Python/torch (torch "
            f"{torch.__version__}); run without --compile"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    engine.decode_model = torch.compile(engine.model, dynamic=True)


def warm_up(engine: Engine, timeout_s: float = WARM_UP_TIMEOUT_S) -> float:
    """Generate through the started `engine` once alone and once as a pair of rows, so that the graphs serving
    needs are compiled now. Returns the seconds it took; raises CompileError when a forward failed."""
    start = time.monotonic()
    prompt = [engine.pad_id] * 3
    for rows in (1, 2):
        done = threading.Semaphore(0)
        events: list[Event] = []

        def on_event(ev: Event, events: list[Event] = events, done: threading.Semaphore = done) -> None:
            if ev.finish_reason is not None:
                events.append(ev)
                done.release()

        for _ in range(rows):
            engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0), on_event)
        for _ in range(rows):
            if not done.acquire(timeout=timeout_s):
                raise CompileError(
                    f"--compile: compiling the model took longer than {timeout_s:.0f} s; run without --compile"
                )
        failed = [e for e in events if e.finish_reason == "error"]
        if failed:
            reason = (failed[0].error or "").strip().splitlines()
            raise CompileError(
                f"--compile: torch.compile failed on this machine: {reason[0][:500] if reason else '?'}"
                "\nRun without --compile. (On a CPU, torch.compile's inductor needs a working C++ "
                "compiler, e.g. `apt-get install g++`; on a GPU, triton.)"
            )
    engine.reset_counters()  # /health counts clients' requests only
    return time.monotonic() - start
