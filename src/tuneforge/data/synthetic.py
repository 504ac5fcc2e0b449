"""Built-in, deterministic, verifiable instruction tasks (no downloads).

Used by the quickstart and the tests: each row is an Alpaca-style {instruction, input, output} whose
answer is checkable by exact match, so that learning is visible in a couple of minutes on a CPU.
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud tiger lamp garden silver paper window orange forest bridge candle "
    "rocket violin pepper island marble shadow winter button castle dragon mirror planet"
).split()

TASKS = {
    "reverse_words": "Reverse the order of these words.",
    "sort_words": "Sort these words alphabetically.",
    "add": "Add these two numbers.",
}


def _row(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"instruction": TASKS[task], "input": f"{a} + {b}", "output": str(a + b)}
    words = rng.sample(WORDS, rng.randint(3, 5))
    answer = list(reversed(words)) if task == "reverse_words" else sorted(words)
    return {"instruction": TASKS[task], "input": " ".join(words), "output": " ".join(answer)}


def generate(task: str, rows: int, seed: int = 0) -> list[dict]:
    """`rows` rows of `task`; the same (task, rows, seed) always gives the same list."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [_row(task, rng) for _ in range(rows)]
