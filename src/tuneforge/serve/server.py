"""OpenAI-compatible HTTP API over a served model (FastAPI + uvicorn), generation batched by `Engine`.

  GET  /health                 liveness + batch occupancy (no API key needed, for load balancers)
  GET  /v1/models              the one model served
  POST /v1/chat/completions    chat, rendered with the model's training chat template
  POST /v1/completions         raw text completion

Both POST routes take max_tokens, temperature, top_p, stop, n, stream (server-sent events ending with
`data: [DONE]`, usage in a last chunk with stream_options.include_usage) and report usage counts.
Every bad request is answered 4xx with an OpenAI-style error body, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.data.templates import prompt_ids
from tuneforge.serve.engine import Engine, Event, SamplingParams, Sequence
from tuneforge.serve.loading import ServedModel, kv_bytes_per_token
from tuneforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

DISCONNECT_POLL_S = 0.25


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its sequences however the stream ends (finished, client gone, error)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunker(rid: str, obj: str, model: str):
    """The SSE line maker of one streamed response: chunk(choices, usage=None) -> 'data: {...}'."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    return chunk


class _Generation:
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

        def gather(ev: Event) -> None:
            parts.append(ev.text)
            if ev.finish_reason is not None:
                whole = Event("".join(parts), ev.finish_reason, ev.completion_tokens, ev.error)
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
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def _events_or_error(gen: _Generation) -> AsyncIterator[tuple[int, Event | str]]:
    """`gen.events()`, with a failure turned into one SSE error event (the status line is already sent)."""
    try:
        async for item in gen.events():
            yield item
    except APIError as e:
        yield -1, _sse(e.body())


async def _collect(gen: _Generation, request: Request) -> tuple[list[str], list[str], int]:
    """All choices' texts, finish reasons and the completion token count; cancelled if the client leaves."""
    texts, reasons, tokens = [""] * len(gen.seqs), [""] * len(gen.seqs), [0] * len(gen.seqs)

    async def consume() -> None:
        async for index, ev in gen.events():
            texts[index] += ev.text
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
    return texts, reasons, sum(tokens)


def create_app(served: ServedModel, engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; `engine` must be started (and is stopped with the app)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="tuneforge", description=f"OpenAI-compatible API for {served.name}", lifespan=lifespan)
    created = int(time.time())
    tok = served.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), None, None).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors()), None, "invalid_value").body(), status_code=400)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'", None,
                           "invalid_api_key")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided; use the key the server was started with "
                           "(--api-key or TUNEFORGE_API_KEY)", None, "invalid_api_key")

    def check_model(model: str | None) -> None:
        if model is not None and model != served.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served.name!r} "
                           "(see GET /v1/models)", "model", "model_not_found")

    def budget(prompt_len: int, max_tokens: int | None, what: str) -> int:
        ctx = served.context_length
        if prompt_len >= ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but the {what} has "
                           f"{prompt_len} tokens; shorten the {what}", what, "context_length_exceeded")
        if max_tokens is None:
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                           f"completion); lower max_tokens to at most {ctx - prompt_len} or shorten the {what}",
                           "max_tokens", "context_length_exceeded")
        return max_tokens

    def params(req, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=req.stop_strings())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "running": engine.running, "waiting": engine.queued,
                "finished": dict(engine.finished), "decode_steps": engine.steps, "kv_cache_tokens": engine.kv_tokens,
                "peak_kv_cache_tokens": engine.peak_kv_tokens, "max_kv_tokens": engine.max_kv_tokens,
                "max_batch_size": engine.max_batch_size}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "tuneforge", "max_model_len": served.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_request(await request.body(), ChatCompletionRequest)
        check_model(req.model)
        messages = [m.as_dict() for m in req.messages]
        try:
            ids = prompt_ids(tok, served.chat_template, messages)
        except Exception as e:  # the template raised (e.g. roles it does not accept)
            raise APIError(400, f"the model's chat template refused these messages: {e}", "messages",
                           "invalid_messages") from None
        limit = budget(len(ids), req.token_limit(), "messages")
        gen = _Generation(engine, [ids], req.n, params(req, limit), req.stream)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", served.name
        if not req.stream:
            texts, reasons, completion = await _collect(gen, request)
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                                 "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
                    "usage": gen.usage(completion)}

        chunk = _chunker(rid, "chat.completion.chunk", model)

        async def stream() -> AsyncIterator[str]:
            completion = 0
            for i in range(len(gen.seqs)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for i, ev in _events_or_error(gen):
                if isinstance(ev, str):
                    yield ev
                    return
                if ev.text:
                    yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": None, "finish_reason": None}])
                if ev.finish_reason:
                    completion += ev.completion_tokens
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}])
            if req.include_usage():
                yield chunk([], gen.usage(completion))
            yield _sse("[DONE]")

        return _CancellingStream(stream(), gen.cancel)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse_request(await request.body(), CompletionRequest)
        check_model(req.model)
        raw = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        prompts = [list(p) if isinstance(p, list) else list(tok(p)["input_ids"]) for p in raw]
        vocab = len(tok)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_value")
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        limit = max(len(p) for p in prompts)
        gen = _Generation(engine, prompts, req.n, params(req, budget(limit, req.token_limit(), "prompt")), req.stream)
        rid, model = f"cmpl-{uuid.uuid4().hex}", served.name
        if not req.stream:
            texts, reasons, completion = await _collect(gen, request)
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                                for i, (t, r) in enumerate(zip(texts, reasons))],
                    "usage": gen.usage(completion)}

        chunk = _chunker(rid, "text_completion", model)

        async def stream() -> AsyncIterator[str]:
            completion = 0
            async for i, ev in _events_or_error(gen):
                if isinstance(ev, str):
                    yield ev
                    return
                if ev.text or ev.finish_reason:
                    yield chunk([{"index": i, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}])
                if ev.finish_reason:
                    completion += ev.completion_tokens
            if req.include_usage():
                yield chunk([], gen.usage(completion))
            yield _sse("[DONE]")

        return _CancellingStream(stream(), gen.cancel)

    return app


def run_server(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch_size: int = 32, batch_window_ms: float = 0.0, log_level: str = "info", *,
               max_kv_tokens: int | None = None, compile_model_first: bool = False) -> None:
    """Start the engine and serve the API until interrupted. `max_kv_tokens` bounds the KV cache (see `Engine`);
    `compile_model_first` torch.compiles the decode step and warms it up before the server opens (CompileError
    if that fails). A KV budget below the model's context raises ValueError."""
    import uvicorn

    engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length,
                    max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, max_kv_tokens=max_kv_tokens)
    per_token = kv_bytes_per_token(served.model)
    if compile_model_first:
        from tuneforge.serve.compile import compile_decode, warm_up

        compile_decode(engine)
        print("torch.compile: compiling the decode step for the shapes serving uses (this takes a while) ...",
              flush=True)
        engine.start()
        try:
            print(f"torch.compile: ready in {warm_up(engine):.0f} s", flush=True)
        except Exception:
            engine.stop()
            raise
    else:
        engine.start()
    app = create_app(served, engine, api_key)
    auth = "API key required" if api_key else "no API key"
    kv = (f"KV cache at most {max_kv_tokens} tokens ({max_kv_tokens * per_token / 2**20:.1f} MiB)"
          if max_kv_tokens else f"KV cache unbounded ({per_token / 1024:.1f} KiB per token)")
    print(f"serving {served.name!r} from {served.source} at http://{host}:{port}/v1 "
          f"(context {served.context_length} tokens, batches of up to {max_batch_size}, {kv}, {auth})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
