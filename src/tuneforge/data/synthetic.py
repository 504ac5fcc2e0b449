"""Built-in, deterministic, verifiable instruction tasks (no downloads).

Used by the quickstart, the real-model recipe and the tests: each row is an Alpaca-style
{instruction, input, output} whose answer is checkable by exact match, so that learning is visible in
minutes on a CPU. The word tasks draw from a few dozen words; the text tasks (`TEXT_TASKS`) take the
sentences of a real text file the user names, so their vocabulary is the open one of real writing.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tuneforge.errors import InputError

WORDS = (
    "apple river stone cloud tiger lamp garden silver paper window orange forest bridge candle "
    "rocket violin pepper island marble shadow winter button castle dragon mirror planet"
).split()

TASKS = {
    "reverse_words": "Reverse the order of these words.",
    "sort_words": "Sort these words alphabetically.",
    "add": "Add these two numbers.",
}


TEXT_TASKS = {
    "extract_numbers": "List every number in the text, in the order they appear, separated by semicolons.",
}
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[a-z]\.)(?=[A-Z])")  # also "end.Next" where paragraphs were joined
SENTENCE_CHARS = (40, 240)


class SyntheticTextError(InputError, ValueError):
    """A text task's source cannot give the rows asked for; the message names the file and the fix."""


def _text_lines(path: Path) -> list[str]:
    """Paragraphs of a .txt file, or the `text` fields of a .jsonl file."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()]
    return raw.splitlines()


def sentences(path: str | Path) -> list[str]:
    """The distinct sentences of a text file, SENTENCE_CHARS long, in file order."""
    seen: dict[str, None] = {}
    for line in _text_lines(Path(path)):
        for s in SENTENCE_END.split(line):
            s = " ".join(s.split())
            if SENTENCE_CHARS[0] <= len(s) <= SENTENCE_CHARS[1]:
                seen.setdefault(s, None)
    return list(seen)


def extract_numbers(text: str) -> str:
    """The numbers of `text` in order ('1,000', '3.5', '10' and '15' of '10-15%'), joined by '; '."""
    return "; ".join(NUMBER.findall(text))


def text_task_rows(task: str, path: str | Path, rows: int, seed: int = 0) -> list[dict]:
    """`rows` rows of a text task, one per distinct sentence of `path` that has an answer (shuffled by seed)."""
    if not Path(path).is_file():
        raise SyntheticTextError(
            f'synthetic.text: {path} does not exist; name a UTF-8 .txt file or a .jsonl file of {{"text": ...}} rows'
        )
    usable = [s for s in sentences(path) if NUMBER.search(s)]
    if len(usable) < rows:
        raise SyntheticTextError(
            f"synthetic.text: {path} has {len(usable)} distinct sentences with a number, fewer "
            f"than synthetic.rows={rows}; lower rows or name a longer text"
        )
    random.Random(f"{task}:{seed}").shuffle(usable)
    return [{"instruction": TEXT_TASKS[task], "input": s, "output": extract_numbers(s)} for s in usable[:rows]]


def _row(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"instruction": TASKS[task], "input": f"{a} + {b}", "output": str(a + b)}
    words = rng.sample(WORDS, rng.randint(3, 5))
    answer = list(reversed(words)) if task == "reverse_words" else sorted(words)
    return {"instruction": TASKS[task], "input": " ".join(words), "output": " ".join(answer)}


def generate(task: str, rows: int, seed: int = 0, text: str | Path | None = None) -> list[dict]:
    """`rows` rows of `task`; the same (task, rows, seed, text) always gives the same list."""
    if task in TEXT_TASKS:
        if text is None:
            raise SyntheticTextError(f"synthetic task {task!r} takes the sentences of a real text: set synthetic.text")
        return text_task_rows(task, text, rows, seed)
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [_row(task, rng) for _ in range(rows)]
