"""One request's generation over the engine: its sequences (n per prompt), the asyncio queue their events arrive
on, server-sent-event framing, and cancelling the sequences when the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from tuneforge.infer.engine import Engine, Event, SamplingParams, Sequence
from tuneforge.serve.protocol import APIError

DISCONNECT_POLL_S = 0.25


class CancellingStream(StreamingResponse):
    """A streaming response that cancels its sequences however the stream ends (finished, client gone, error)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def chunker(rid: str, obj: str, model: str):
    """The SSE line maker of one streamed response: chunk(choices, usage=None) -> 'data: {...}'."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    return chunk


class Generation:
    """The sequences of one request (n per prompt) and the asyncio queue their events arrive on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams, stream: bool):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.seqs: list[Sequence] = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                self.seqs.append(engine.submit(ids, params, self._deliver(loop, p * n + j, stream)))
        self.open = len(self.seqs)

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int, stream: bool) -> Callable[[Event], None]:
        """The engine-thread callback of one sequence. Without streaming, text is gathered there and handed
        over once at the end: waking the event loop for every token of every row costs throughput."""
        if stream:
            return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))
        parts: list[str] = []
        logprobs: list = []

        def gather(ev: Event) -> None:
            parts.append(ev.text)
            logprobs.extend(ev.logprobs or ())
            if ev.finish_reason is not None:
                lps = tuple(logprobs) if ev.logprobs is not None else None
                whole = Event("".join(parts), ev.finish_reason, ev.completion_tokens, ev.error, lps)
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, whole))

        return gather

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            index, ev = await self.queue.get()
            if ev.finish_reason == "error":
                self.cancel()
                raise APIError(500, f"generation failed: {ev.error}", None, "generation_failed")
            if ev.finish_reason is not None:
                self.open -= 1
            yield index, ev

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


async def events_or_error(gen: Generation) -> AsyncIterator[tuple[int, Event | str]]:
    """`gen.events()`, with a failure turned into one SSE error event (the status line is already sent)."""
    try:
        async for item in gen.events():
            yield item
    except APIError as e:
        yield -1, sse(e.body())


async def collect(gen: Generation, request: Request) -> tuple[list[str], list[str], int, list[list]]:
    """All choices' texts, finish reasons, the completion token count and each choice's token log-probabilities
    (empty unless asked for); cancelled if the client leaves."""
    texts, reasons, tokens = [""] * len(gen.seqs), [""] * len(gen.seqs), [0] * len(gen.seqs)
    logprobs: list[list] = [[] for _ in gen.seqs]

    async def consume() -> None:
        async for index, ev in gen.events():
            texts[index] += ev.text
            logprobs[index].extend(ev.logprobs or ())
            if ev.finish_reason:
                reasons[index], tokens[index] = ev.finish_reason, ev.completion_tokens

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    work, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not work.done()
        if gone:  # the client left (or this handler was cancelled): free the batch slots
            work.cancel()
            gen.cancel()
    if gone:
        raise APIError(499, "client closed the request", None, "client_closed")
    work.result()
    return texts, reasons, sum(tokens), logprobs
