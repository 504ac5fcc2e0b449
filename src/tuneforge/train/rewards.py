"""The rewards of a grpo run (objective.grpo.rewards): built-ins and user functions, each called once per step on
all the step's completions, checked, and weighted into the total reward.

Every reward is called as f(prompts, completions, rows) with three lists of the same length, one entry per
completion: the prompt text, the completion text, and the completion's data row (a dict: prompt, reference,
completion_tokens). It returns one float per completion.

  exact_match   1.0 when the completion, stripped, equals the reference answer, stripped; else 0.0
  numeric       1.0 when the completion's last number equals the reference's last number (thousands commas, a
                currency sign or units after the number, and trailing punctuation ignored: "$1,234.00 dollars."
                reads 1234); 0.0 otherwise, and when either has no number
  format        1.0 when the regular expression `pattern` matches somewhere in the completion (re.search)
  length        -max(0, completion_tokens - target_tokens) / max_new_tokens

A reward that raises, returns a wrong number of values, or a value that is not a finite number stops the run
with a RewardError naming the function and the data row."""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.config.objective import RewardConfig
from tuneforge.errors import InputError, TuneforgeError

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(TuneforgeError):
    """A reward function failed on the run's completions: its name and the row are in the message."""


def last_number(text: str) -> float | None:
    """The last number written in `text` ("... so she has 1,234.5 apples." -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    return [float(c.strip() == str(r["reference"]).strip()) for c, r in zip(completions, rows)]


def numeric(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    out = []
    for c, r in zip(completions, rows):
        got, want = last_number(c), last_number(str(r["reference"]))
        out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)))
    return out


def format_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def format(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:  # noqa: A001
        return [float(compiled.search(c) is not None) for c in completions]

    return format


def length_penalty(target_tokens: int, max_new_tokens: int) -> RewardFn:
    def length(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [-max(0, int(r["completion_tokens"]) - target_tokens) / max_new_tokens for r in rows]

    return length


def load_function(spec: str) -> RewardFn:
    """`module:function` -> the callable; InputError naming the spec when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise InputError(
            f"objective.grpo.rewards: cannot import module {module_name!r} of reward {spec!r}: {e}. Put the module "
            "on PYTHONPATH (or in the directory you run tuneforge from)"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"objective.grpo.rewards: {module_name} has no function {attr!r} (reward {spec!r})")
    return fn


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def build_rewards(configs: list[RewardConfig], max_new_tokens: int) -> list[Reward]:
    out = []
    for c in configs:
        if c.function is not None:
            fn = load_function(c.function)
        elif c.type == "exact_match":
            fn = exact_match
        elif c.type == "numeric":
            fn = numeric
        elif c.type == "format":
            fn = format_reward(c.pattern)
        else:
            fn = length_penalty(c.target_tokens, max_new_tokens)
        out.append(Reward(c.name, c.weight, fn))
    return out


def _row_name(rows: list[dict], i: int) -> str:
    r = rows[i]
    prompt = str(r.get("prompt", ""))
    prompt = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    return f"completion {i} (data row {r.get('row', '?')}, prompt {prompt!r})"


def score(reward: Reward, prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """The reward's value for every completion, checked: RewardError names the function and the row."""
    try:
        values = reward.fn(prompts, completions, rows)
    except Exception as e:  # noqa: BLE001 - any failure of a user's function stops the run, named
        raise RewardError(
            f"reward {reward.name} raised {type(e).__name__}: {e} (called on the {len(completions)} completions of "
            f"data rows {sorted({r.get('row') for r in rows})}, first {_row_name(rows, 0)}); fix the function"
        ) from e
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward {reward.name} returned {type(values).__name__}, not a list of one float per completion"
        ) from None
    if len(values) != len(completions):
        raise RewardError(
            f"reward {reward.name} returned {len(values)} values for {len(completions)} completions: return one "
            "float per completion"
        )
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {reward.name} returned {v!r} ({type(v).__name__}) for {_row_name(rows, i)}: return a float"
            )
        if not math.isfinite(float(v)):
            raise RewardError(f"reward {reward.name} returned {v} for {_row_name(rows, i)}: return a finite float")
        out.append(float(v))
    return out
