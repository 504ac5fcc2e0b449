"""One sequence being generated: how (SamplingParams), what the engine reports (Event), and its state (Sequence):
tokens so far, text reported so far, stop tokens and stop strings (which never leak into the reported text)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. temperature 0 = greedy; `stop` holds stop strings (not tokens)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none computed; k >= 0: each token's log-probability and the top k
    seed: int | None = None  # the sequence's own random stream: its samples do not depend on the rows beside it


@dataclass(frozen=True)
class Event:
    """What the engine reports for a sequence: new text, and at the end why it finished.

    finish_reason is None while running, then "stop" (stop token or string), "length" (max_tokens or the
    context), "cancelled", or "error" (with `error` holding the reason).
    """

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    # with SamplingParams.logprobs: (token id, log p, ((top id, log p), ...)) of the tokens generated since the
    # previous event (a stop token excluded)
    logprobs: tuple[TokenLogprob, ...] | None = None


TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


class Sequence:
    """One continuation being generated: its prompt, tokens so far, and the text already reported."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.generated: list[int] = []
        self.emitted = 0  # characters of text already reported
        self.finished = False
        self.cancelled = False
        self.on_finish: Callable[[str], None] | None = None  # set by the engine, to count finish reasons
        self.pending_logprob: tuple[float, tuple[tuple[int, float], ...]] | None = None  # set by the engine
        self.unreported: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None  # the engine's per-sequence stream, for params.seed

    def cancel(self) -> None:
        """Ask the engine to drop this sequence (thread-safe; takes effect before the next decode step)."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.finished = True
            if self.on_finish is not None:
                self.on_finish(event.finish_reason)
        try:
            self.on_event(event)
        except Exception:  # the listener is gone (e.g. the event loop closed): nobody wants the rest
            self.cancelled = True

    def advance(self, token: int, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], room: int) -> None:
        """Take one generated token: report the new text, and finish on a stop token/string or the length limit.
        `room` is how many more tokens fit in the model's context after this one."""
        self.generated.append(token)
        reason = None
        ids = self.generated
        if self.pending_logprob is not None:
            if token not in stop_ids:
                self.unreported.append((token, *self.pending_logprob))
            self.pending_logprob = None
        if token in stop_ids:
            reason, ids = "stop", ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        longest = max((len(s) for s in self.params.stop), default=0)
        cut = _first_stop(text, self.params.stop, max(0, self.emitted - longest))
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is None and (len(self.generated) >= self.params.max_tokens or room <= 0):
            reason = "length"
        safe = len(text) if reason else len(text) - _held_back(text, self.params.stop)
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        if delta or reason:
            logprobs = None
            if self.params.logprobs is not None:
                logprobs, self.unreported = tuple(self.unreported), []
            self.emit(Event(delta, reason, len(self.generated), logprobs=logprobs))


def _first_stop(text: str, stops: Seq[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Seq[str]) -> int:
    """Characters at the end of `text` not yet safe to send: a partial UTF-8 character, or a prefix of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
