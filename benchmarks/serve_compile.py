"""`tuneforge serve --compile` vs eager: decode steps per second of the serving engine, in one process.

Two engines share one model: one decodes eagerly, the other through torch.compile (what `--compile` sets up,
warmed up first). Each round submits B prompts of 10-17 tokens, greedy, 48 new tokens each, without stop
tokens; rounds alternate between the engines (5 by default), so background load hits both alike, and the
median with min-max is reported, of each engine's steps/s and of the per-round ratio. Model: the random-init
Llama of serve_throughput.py (hidden 256, 2 layers), or --model RUN_OR_DIR.

  python benchmarks/serve_compile.py [--model runs/quickstart] [--batch 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def steps_per_s(engine, rows: int, new_tokens: int = 48) -> float:
    from tuneforge.infer.engine import SamplingParams

    done = threading.Semaphore(0)

    def on_event(ev) -> None:
        if ev.finish_reason:
            done.release()

    start_steps, start = engine.steps, time.perf_counter()
    for i in range(rows):
        engine.submit(list(range(3, 13 + i)), SamplingParams(max_tokens=new_tokens, temperature=0.0), on_event)
    for _ in range(rows):
        assert done.acquire(timeout=600)
    return (engine.steps - start_steps) / (time.perf_counter() - start)


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run or model directory (default: a random-init model built here)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch

    from tuneforge.infer.engine import Engine
    from tuneforge.serve.compile import compile_decode, warm_up
    from tuneforge.serve.loading import load_served

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            from serve_throughput import build_model

            model_dir = build_model(Path(tmp) / "model")
        served = load_served(model_dir, device="auto")
        make = lambda: Engine(served.model, served.tokenizer, [], served.context_length, max_batch_size=64)  # noqa: E731
        eager, compiled = make().start(), make()
        compile_decode(compiled)
        compiled.start()
        print(f"torch.compile warm-up: {warm_up(compiled):.1f} s ({served.model.device}, {args.threads} threads)")
        try:
            for rows in args.batch:
                steps_per_s(eager, rows), steps_per_s(compiled, rows)  # first use of these shapes
                runs = [(steps_per_s(eager, rows), steps_per_s(compiled, rows)) for _ in range(args.rounds)]
                e, c, x = ([f(r) for r in runs] for f in (lambda r: r[0], lambda r: r[1], lambda r: r[1] / r[0]))
                print(
                    f"batch {rows}: eager {spread(e, '.0f')} steps/s, compiled {spread(c, '.0f')} steps/s, "
                    f"ratio {spread(x, '.2f')}x (median (min-max) of {args.rounds} rounds)"
                )
        finally:
            eager.stop()
            compiled.stop()


if __name__ == "__main__":
    main()
