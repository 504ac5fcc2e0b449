"""Continuous batching for serving: one scheduler thread runs every pending request in one KV-cached decode loop.

Why: at decode time a forward pass over B rows costs little more than over one row (the weights are read
once per step either way), so answering concurrent requests one at a time wastes most of the hardware.

How: requests wait in a queue. When nothing is running, the scheduler takes every waiting request (after
waiting `batch_window_ms` for more, if set) and prefills them as one left-padded batch. Between decode steps
it prefills newly arrived
requests the same way and merges them into the running batch (their KV caches are left-padded to a common
length and concatenated along the batch axis; per-row position ids keep each row's positions exact).
Finished and cancelled rows leave the batch at once, so a client that disconnects frees its slot at the next
step. Text is decoded incrementally; stop strings are matched on text and never leak into a stream.

KV-cache budget: the cache holds rows x width positions per layer (width = the longest row, the others are
left-padded to it). With `max_kv_tokens` set, a request is admitted only while (rows + 1) x the longest
reservation stays within the budget, a row reserving prompt + max_tokens positions (at most the context), so
the cache can never outgrow the budget however the running rows continue. Requests wait in arrival order: one
that does not fit yet holds back the ones behind it until rows finish.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

# newer transformers 5.x name the KV-cache argument `cache` (and warn on `past_key_values`); older 5.x know only
# the old name
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. temperature 0 = greedy; `stop` holds stop strings (not tokens)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


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
            self.emit(Event(delta, reason, len(self.generated)))


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


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling at that row's temperature/top_p."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    t = torch.where(hot, temperature, torch.ones_like(temperature))[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # the first token is always kept
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    return torch.where(hot, order.gather(-1, pick[:, None]).squeeze(-1), greedy)


# ---------------------------------------------------------------------------- KV cache surgery
def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise RuntimeError("continuous batching needs a model with a standard key/value cache (DynamicCache layers)")
    return [(layer.keys, layer.values) for layer in layers]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Two left-padded batches as one: caches and masks left-padded to the longer length, then stacked."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    kv = [
        (
            torch.cat([_left_pad(ka, width, 2), _left_pad(kb, width, 2)]),
            torch.cat([_left_pad(va, width, 2), _left_pad(vb, width, 2)]),
        )
        for (ka, va), (kb, vb) in zip(_kv(cache_a), _kv(cache_b))
    ]
    return DynamicCache(ddp_cache_data=kv), torch.cat([_left_pad(mask_a, width, 1), _left_pad(mask_b, width, 1)])


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows`, and drop the leading columns that are padding in every kept row."""
    mask = mask[rows]
    first = int(mask.any(0).nonzero()[0]) if mask.numel() else 0
    kv = [(k[rows, :, first:].contiguous(), v[rows, :, first:].contiguous()) for k, v in _kv(cache)]
    return DynamicCache(ddp_cache_data=kv), mask[:, first:]


def contiguous(cache: DynamicCache) -> DynamicCache:
    """The cache with contiguous key/value tensors. A prefill leaves them transposed views; a torch.compile'd
    decode step guards on strides, so every cache it sees has one layout (else each layout compiles anew)."""
    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in _kv(cache)])


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Generates for many concurrent requests with one model, batching them in a background thread.

    `submit` is thread-safe and returns at once; results arrive through the request's `on_event` callback,
    called from the engine thread (hand them to your own thread or event loop from there).
    """

    def __init__(
        self,
        model,
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: Seq[int],
        context_length: int,
        max_batch_size: int = 32,
        batch_window_ms: float = 0.0,
        seed: int = 0,
        max_kv_tokens: int | None = None,
    ):
        if max_kv_tokens is not None and max_kv_tokens < context_length:
            raise ValueError(
                f"max_kv_tokens {max_kv_tokens} is less than the model's context ({context_length} "
                f"tokens): one full-length request would never fit; use at least {context_length}, "
                "or no limit"
            )
        self.model = model
        self.decode_model = model  # what runs the decode steps (`serve --compile` puts a compiled model here)
        self.tokenizer = tokenizer
        self.stop_ids = {int(t) for t in stop_token_ids}
        self.context_length = int(context_length)
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.batch_window_s = batch_window_ms / 1000.0
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self._held: Sequence | None = None  # taken from the queue but not admitted yet (did not fit the KV budget)
        self.rows: list[Sequence] = []  # the running batch, in cache order
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 where a row has a real token
        self.next_tokens: torch.Tensor | None = None  # each row's newest token, not yet in the cache
        self.positions: torch.Tensor | None = None  # each row's position for its next token
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.finished: dict[str, int] = {}  # sequences finished, by finish reason
        self.peak_running = 0  # most rows ever in the batch
        self.peak_kv_tokens = 0  # largest cache ever held, in positions (rows x width; x layers x 2 for tensors)

    # -- public
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="tuneforge-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Sequence:
        """Queue one sequence; the caller has checked that the prompt fits the context."""
        seq = Sequence(prompt_ids, params, on_event)
        seq.on_finish = self._count
        self.waiting.put(seq)
        return seq

    def reset_counters(self) -> None:
        """Zero the finished counts, decode steps and peaks (after a warm-up, before serving)."""
        self.finished, self.steps, self.peak_running, self.peak_kv_tokens = {}, 0, 0, 0

    def _count(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        """Requests submitted and not yet in the batch."""
        return self.waiting.qsize() + (self._held is not None)

    @property
    def kv_tokens(self) -> int:
        """Positions in the KV cache now (rows x width, padding included)."""
        mask = self.mask
        return 0 if mask is None else int(mask.shape[0] * mask.shape[1])

    def reservation(self, seq: Sequence) -> int:
        """Cache positions `seq` may come to need: its prompt plus max_tokens, at most the context."""
        return min(len(seq.prompt_ids) + seq.params.max_tokens, self.context_length)

    # -- scheduler
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                new = self._collect()
                try:
                    if new:
                        self._prefill(new)
                    if self.rows:
                        self._decode_step()
                except Exception as e:  # a failed forward fails the batch, not the server
                    for seq in [*self.rows, *new]:
                        if not seq.finished:
                            seq.emit(Event("", "error", len(seq.generated), f"{type(e).__name__}: {e}"))
                    self._reset()

    def _collect(self) -> list[Sequence]:
        """Requests to admit now: without a running batch, wait a little so that arrivals batch together.
        Stops at the batch size, and at the first request that does not fit the KV budget (kept for later)."""
        new: list[Sequence] = []
        idle = not self.rows
        deadline = None
        while len(self.rows) + len(new) < self.max_batch_size:
            if idle and not new:
                timeout = 0.05
            elif deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            else:
                timeout = 0.0
            seq = self._take(timeout)
            if seq is None:
                break
            if seq.cancelled:
                seq.emit(Event("", "cancelled", 0))
                continue
            if not self._fits(new, seq):
                self._held = seq
                break
            new.append(seq)
            if idle and deadline is None:
                deadline = time.monotonic() + self.batch_window_s
        return new

    def _take(self, timeout: float) -> Sequence | None:
        if self._held is not None:
            seq, self._held = self._held, None
            return seq
        try:
            return self.waiting.get(timeout=timeout) if timeout > 0 else self.waiting.get_nowait()
        except queue.Empty:
            return None

    def _fits(self, new: list[Sequence], seq: Sequence) -> bool:
        if self.max_kv_tokens is None:
            return True
        reserved = [self.reservation(s) for s in (*self.rows, *new, seq)]
        return len(reserved) * max(reserved) <= self.max_kv_tokens

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, model=None):
        """Last-position logits; `cache` is extended in place with this input's keys and values."""
        out = (self.model if model is None else model)(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE_ARG: cache}
        )
        return out.logits[:, -1], cache

    def _prefill(self, seqs: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every row's next token lands in the same column
            ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        cache = contiguous(cache)
        tokens = self._sample(logits, seqs)
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=self.device)
        if self.rows:
            self.cache, self.mask = merge_batches(self.cache, self.mask, cache, mask)
            self.next_tokens = torch.cat([self.next_tokens, tokens])
            self.positions = torch.cat([self.positions, lengths])
        else:
            self.cache, self.mask, self.next_tokens, self.positions = cache, mask, tokens, lengths
        self.rows.extend(seqs)
        self._note_peaks()
        self._advance(tokens, seqs, lengths)

    def _decode_step(self) -> None:
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache = self._forward(
            self.next_tokens[:, None], mask, self.positions[:, None], self.cache, self.decode_model
        )
        self.mask = mask
        self._note_peaks()
        self.positions = self.positions + 1
        self.next_tokens = self._sample(logits, self.rows)
        self.steps += 1
        self._advance(self.next_tokens, self.rows, self.positions)

    def _note_peaks(self) -> None:
        self.peak_running = max(self.peak_running, len(self.rows))
        self.peak_kv_tokens = max(self.peak_kv_tokens, self.kv_tokens)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        return sample(logits, temps, top_p, self.generator)

    def _advance(self, tokens: torch.Tensor, seqs: list[Sequence], lengths: torch.Tensor) -> None:
        """Hand each row its token, then drop rows that finished or were cancelled from the batch."""
        for seq, token, length in zip(seqs, tokens.tolist(), lengths.tolist()):
            if not seq.cancelled:
                seq.advance(token, self.tokenizer, self.stop_ids, self.context_length - length - 1)
        keep = [i for i, s in enumerate(self.rows) if not s.finished and not s.cancelled]
        for s in self.rows:
            if s.cancelled and not s.finished:
                s.emit(Event("", "cancelled", len(s.generated)))
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache, self.mask = select_rows(self.cache, self.mask, idx)
        self.next_tokens, self.positions = self.next_tokens[idx], self.positions[idx]
        self.rows = [self.rows[i] for i in keep]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.next_tokens, self.positions = [], None, None, None, None
