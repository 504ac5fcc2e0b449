"""Continuous batching: one KV-cached decode loop runs every pending sequence, for serving and for evaluation.

Why: at decode time a forward pass over B rows costs little more than over one row (the weights are read
once per step either way), so generating for many sequences one at a time wastes most of the hardware.

Two drivers share one scheduler step (`_step`: admit, prefill, decode):
- `start()` / `submit()` / `stop()`: a background thread serves concurrent requests (the HTTP server).
- `run_to_completion(prompts, params)`: the calling thread generates for a fixed list of prompts and returns
  their tokens (evaluation, rollouts). No thread and no timing: the sequence of forward calls depends only on
  the prompts and the outputs, so every rank of a sharded model (FSDP2, ZeRO-3) runs the same collectives.

How: sequences wait in arrival order. When nothing is running, the scheduler takes every waiting sequence (in
the thread, after waiting `batch_window_ms` for more, if set) up to the batch size and prefills them as one
left-padded batch. Between decode steps it prefills newly admitted sequences the same way and merges them into
the running batch (their KV caches are left-padded to a common length and concatenated along the batch axis;
per-row position ids keep each row's positions exact; see `kv_cache`). Finished and cancelled rows leave the
batch at once, so a client that disconnects frees its slot at the next step. Text is decoded incrementally;
stop strings are matched on text and never leak into a stream.

KV-cache budget: the cache holds rows x width positions per layer (width = the longest row, the others are
left-padded to it). With `max_kv_tokens` set, a request is admitted only while (rows + 1) x the longest
reservation stays within the budget, a row reserving prompt + max_tokens positions (at most the context), so
the cache can never outgrow the budget however the running rows continue. Requests wait in arrival order: one
that does not fit yet holds back the ones behind it until rows finish.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from tuneforge.infer.kv_cache import contiguous, merge_batches, select_rows
from tuneforge.infer.sampling import sample, token_logprobs
from tuneforge.infer.sequence import Event, SamplingParams, Sequence

__all__ = ["CACHE_ARG", "Engine", "Event", "SamplingParams", "Sequence", "sample"]

# newer transformers 5.x name the KV-cache argument `cache` (and warn on `past_key_values`); older 5.x know only
# the old name
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _ignore(event: Event) -> None:
    """run_to_completion's listener: its caller reads the tokens at the end, not the events."""


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward computes the LM head on the last `logits_to_keep` positions only (transformers'
    causal LMs do; peft passes the argument through to them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Generates for many sequences with one model, batching them: concurrent requests in a background thread
    (`start`, `submit`, `stop`), or a fixed list of prompts in the calling thread (`run_to_completion`).

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
        self._last_logits_only = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
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

    def run_to_completion(
        self,
        prompts: Seq[list[int]],
        params: SamplingParams | Seq[SamplingParams],
        on_finished: Callable[[int], None] | None = None,
    ) -> list[list[int]]:
        """Generate for every prompt in the calling thread and return each one's generated tokens (a final stop
        token included); `params` for all prompts, or one per prompt. At most `max_batch_size` rows run at once; a
        finished row's slot goes to the next prompt at the next step. `on_finished(n)` is called after each step in
        which n sequences finished (progress).

        Deterministic: the forward calls depend only on the prompts, the outputs and the seed, never on timing,
        so every rank of a sharded model (FSDP2, ZeRO-3: parameters gathered collectively) makes the same calls.
        Runs under no_grad, as HF generate does (not inference_mode: a tensor a module caches while generating, e.g.
        a resized rotary table, would be an inference tensor that the next training step's backward refuses).
        A failed forward raises. Not while the thread of `start()` runs."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("run_to_completion: the engine's serving thread is running; stop() it first")
        finished = [0]

        def count(reason: str) -> None:
            finished[0] += 1
            self._count(reason)

        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(each) != len(prompts):
            raise ValueError(f"run_to_completion: {len(each)} SamplingParams for {len(prompts)} prompts")
        seqs = [Sequence(p, q, _ignore) for p, q in zip(prompts, each)]
        for s in seqs:
            s.on_finish = count
        pending = deque(seqs)
        try:
            with torch.no_grad():
                while pending or self.rows:
                    new = self._admit(pending)
                    if not new and not self.rows:  # only a KV budget below one reservation could do this
                        raise RuntimeError(f"a {len(pending[0].prompt_ids)}-token prompt never fits max_kv_tokens")
                    self._step(new)
                    if finished[0] and on_finished is not None:
                        on_finished(finished[0])
                    finished[0] = 0
        finally:
            self._reset()
        return [s.generated for s in seqs]

    # -- scheduler
    def _step(self, new: list[Sequence]) -> None:
        """One scheduling step, shared by both drivers: prefill the newly admitted sequences into the running
        batch, then one decode step over every running row."""
        if new:
            self._prefill(new)
        if self.rows:
            self._decode_step()

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                new = self._collect()
                try:
                    self._step(new)
                except Exception as e:  # a failed forward fails the batch, not the server
                    for seq in [*self.rows, *new]:
                        if not seq.finished:
                            seq.emit(Event("", "error", len(seq.generated), f"{type(e).__name__}: {e}"))
                    self._reset()

    def _admit(self, pending: deque[Sequence]) -> list[Sequence]:
        """run_to_completion's admission: waiting sequences in order, up to the batch size and the KV budget."""
        new: list[Sequence] = []
        while pending and len(self.rows) + len(new) < self.max_batch_size and self._fits(new, pending[0]):
            new.append(pending.popleft())
        return new

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

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, model=None, **kw
    ):
        """Last-position logits; `cache` is extended in place with this input's keys and values."""
        out = (self.model if model is None else model)(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE_ARG: cache}, **kw
        )
        return out.logits[:, -1], cache

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the new prompts through the model as one left-padded batch and merge them into the running one. A
        prompt admitted several times in the batch (GRPO's G completions of one prompt) runs once; its row of
        the cache and its logits are then copied to each of its sequences."""
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(s.prompt_ids), len(unique)) for s in seqs]
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # the LM head on the last position only (a prompt's other logits are never used)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), **self._last_logits_only)
        if len(prompts) < len(seqs):
            rows = torch.tensor(row_of, device=self.device)
            cache, mask = select_rows(cache, mask, rows)  # contiguous copies, one row per sequence
            logits = logits[rows]
        else:
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
        for s in seqs:
            if s.params.seed is not None and s.generator is None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
        own = [s.generator for s in seqs] if any(s.generator is not None for s in seqs) else None
        tokens = sample(logits, temps, top_p, self.generator, own)
        asked = [s.params.logprobs for s in seqs]
        if any(k is not None for k in asked):  # only then: the default path computes nothing more
            chosen, values, ids = token_logprobs(logits, tokens, max(k or 0 for k in asked))
            chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
            for j, (s, k) in enumerate(zip(seqs, asked)):
                if k is not None:
                    s.pending_logprob = (chosen[j], tuple(zip(ids[j][:k], values[j][:k])))
        return tokens

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
