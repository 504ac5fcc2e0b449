"""OpenAI-compatible HTTP API over a served model (FastAPI + uvicorn), generation batched by `Engine`.

  GET  /health                 liveness + batch occupancy (no API key needed, for load balancers)
  GET  /v1/models              the one model served; GET /v1/models/{id} that model
  POST /v1/chat/completions    chat, rendered with the model's training chat template
  POST /v1/completions         raw text completion

Both POST routes take max_tokens, temperature, top_p, stop, n, logprobs, stream (server-sent events ending with
`data: [DONE]`, usage in a last chunk with stream_options.include_usage) and report usage counts; chat takes
tools / tool_choice and answers parsed tool_calls (infer/tool_parsing.py).
Every bad request is answered 4xx with an OpenAI-style error body, never a 500. Request bodies and prompts x n
are capped (`limits.RequestLimits`); prompts are rendered and tokenised on worker threads, so the event loop
(and /health) keeps answering while a large prompt is tokenised. With an API key, /docs, /redoc and
/openapi.json need it too.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.data.masks import rendered_ids
from tuneforge.data.templates import TemplateChoiceError, render
from tuneforge.infer.engine import Engine, SamplingParams
from tuneforge.infer.tool_parsing import ToolCallParser, chat_choice, stream_deltas
from tuneforge.serve.generation import CancellingStream, Generation, chunker, collect, events_or_error, sse
from tuneforge.serve.limits import (
    RequestLimits,
    check_chars,
    exposure_error,
    is_loopback,
    max_chars_per_token,
    read_body,
)
from tuneforge.serve.loading import ServedModel, kv_bytes_per_token
from tuneforge.serve.logprobs import chat_logprobs, completion_logprobs
from tuneforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

SHORT_PROMPT_CHARS = 8192  # tokenised in well under 10 ms


def _chat_ids(
    served: ServedModel, messages: list[dict], per_token: int | None, tools: list[dict] | None = None
) -> list[int]:
    """The conversation's prompt ids (as `prompt_ids`), refused by its rendered length first when that is safe.
    `tools` go to the template as training passed them (data/rendering.py). Runs on a worker thread."""
    try:
        text = render(served.tokenizer, served.chat_template, messages, True, tools=tools)
    except Exception as e:  # the template raised (e.g. roles it does not accept, or it cannot render tools)
        param = "tools" if tools and isinstance(e, TemplateChoiceError) else "messages"
        raise APIError(
            400, f"the model's chat template refused these messages: {e}", param, "invalid_messages"
        ) from None
    check_chars(len(text), served.context_length, per_token, "messages")
    return rendered_ids(served.tokenizer, text)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of completion prompts (runs on a worker thread; fast tokenizers release the GIL meanwhile)."""
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def create_app(
    served: ServedModel, engine: Engine, api_key: str | None = None, limits: RequestLimits | None = None
) -> FastAPI:
    """The FastAPI app; `engine` must be started (and is stopped with the app)."""
    limits = limits or RequestLimits()
    tok = served.tokenizer
    tok("", add_special_tokens=False)  # transformers settles the tokenizer's state now, not in racing threads
    tok("")
    per_token = max_chars_per_token(tok)
    vocab = len(tok)
    # tokenising releases the GIL but takes a core: leave one to the event loop and the engine
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # short prompts have a thread of their own, so they never queue behind someone's megabyte
    pools = (
        ThreadPoolExecutor(1, thread_name_prefix="tuneforge-short-prompts"),
        ThreadPoolExecutor(max(1, min(4, cores - 1)), thread_name_prefix="tuneforge-long-prompts"),
    )

    async def off_loop(chars: int, fn, *args):
        pool = pools[chars > SHORT_PROMPT_CHARS]
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.stop()
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    keyed = api_key is not None  # with a key, the API description is behind it too (routes below)
    app = FastAPI(
        title="tuneforge",
        description=f"OpenAI-compatible API for {served.name}",
        lifespan=lifespan,
        **({"openapi_url": None, "docs_url": None, "redoc_url": None} if keyed else {}),
    )
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        # after a 413 the rest of the body is not read: close the connection
        headers = {"Connection": "close"} if e.status == 413 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

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
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'", None, "invalid_api_key"
            )
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "incorrect API key provided; use the key the server was started with (--api-key or TUNEFORGE_API_KEY)",
                None,
                "invalid_api_key",
            )

    def check_model(model: str | None) -> None:
        if model is not None and model != served.name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {served.name!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    def budget(prompt_len: int, max_tokens: int | None, what: str) -> int:
        ctx = served.context_length
        if prompt_len >= ctx:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens, but the {what} has "
                f"{prompt_len} tokens; shorten the {what}",
                what,
                "context_length_exceeded",
            )
        if max_tokens is None:
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens, but you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion); lower max_tokens to at most {ctx - prompt_len} or shorten the {what}",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def params(req, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_strings(),
            logprobs=req.logprobs_k(),
        )

    if keyed:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request):
            check_key(request)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request):
            check_key(request)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="tuneforge - Swagger UI")

        @app.get("/redoc", include_in_schema=False)
        async def redoc(request: Request):
            check_key(request)
            return get_redoc_html(openapi_url="/openapi.json", title="tuneforge - ReDoc")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": served.name,
            "running": engine.running,
            "waiting": engine.queued,
            "finished": dict(engine.finished),
            "decode_steps": engine.steps,
            "kv_cache_tokens": engine.kv_tokens,
            "peak_kv_cache_tokens": engine.peak_kv_tokens,
            "max_kv_tokens": engine.max_kv_tokens,
            "max_batch_size": engine.max_batch_size,
        }

    def model_card() -> dict:
        return {
            "id": served.name,
            "object": "model",
            "created": created,
            "owned_by": "tuneforge",
            "max_model_len": served.context_length,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request)
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_request(await read_body(request, limits.max_request_bytes), ChatCompletionRequest)
        check_model(req.model)
        limits.check_sequences(1, req.n)
        messages = [m.as_dict() for m in req.messages]
        tools = req.offered_tools()
        names = {t["function"]["name"] for t in tools} if tools else None
        chars = sum(len(m["content"]) for m in messages) + len(json.dumps(tools or []))
        ids = await off_loop(chars, _chat_ids, served, messages, per_token, tools)
        limit = budget(len(ids), req.token_limit(), "messages")
        gen = Generation(engine, [ids], req.n, params(req, limit), req.stream)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", served.name
        chat_lps = (lambda entries: chat_logprobs(tok, entries)) if req.logprobs_k() is not None else (lambda _: None)
        if not req.stream:
            texts, reasons, completion, lps = await collect(gen, request)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": i, **chat_choice(t, r, names), "logprobs": chat_lps(lps[i])}
                    for i, (t, r) in enumerate(zip(texts, reasons))
                ],
                "usage": gen.usage(completion),
            }

        chunk = chunker(rid, "chat.completion.chunk", model)
        parsers = [ToolCallParser(names) for _ in gen.seqs] if tools else None

        def deltas(i: int, text: str, final: bool) -> list[dict]:
            if parsers is None:
                return [{"content": text}] if text else []
            items = parsers[i].feed(text) + (parsers[i].finish() if final else [])
            return [d for x in items for d in stream_deltas(x, parsers[i].calls)]

        async def stream() -> AsyncIterator[str]:
            completion = 0
            for i in range(len(gen.seqs)):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            async for i, ev in events_or_error(gen):
                if isinstance(ev, str):
                    yield ev
                    return
                ds = deltas(i, ev.text, bool(ev.finish_reason))
                if ev.logprobs and not ds:  # text held back (a possible tool call): its tokens' logprobs now
                    ds = [{}]
                for k, delta in enumerate(ds):
                    lp = chat_lps(ev.logprobs) if k == 0 and ev.logprobs else None
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
                if ev.finish_reason:
                    completion += ev.completion_tokens
                    reason = ev.finish_reason
                    if parsers is not None and parsers[i].calls and reason == "stop":
                        reason = "tool_calls"
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
            if req.include_usage():
                yield chunk([], gen.usage(completion))
            yield sse("[DONE]")

        return CancellingStream(stream(), gen.cancel)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse_request(await read_body(request, limits.max_request_bytes), CompletionRequest)
        check_model(req.model)
        raw = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        limits.check_sequences(len(raw), req.n)
        # the cheap refusals first: token-id prompts by their length, texts by their characters
        for p in raw:
            if isinstance(p, str):
                check_chars(len(p), served.context_length, per_token, "prompt")
            else:
                budget(len(p), None, "prompt")
        texts = [p for p in raw if isinstance(p, str)]
        encoded = iter(await off_loop(sum(map(len, texts)), _encode, tok, texts) if texts else [])
        prompts = [list(p) if isinstance(p, list) else next(encoded) for p in raw]
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        limit = budget(max(len(p) for p in prompts), req.token_limit(), "prompt")
        if any(not 0 <= t < vocab for p in raw if isinstance(p, list) for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_value")
        gen = Generation(engine, prompts, req.n, params(req, limit), req.stream)
        rid, model = f"cmpl-{uuid.uuid4().hex}", served.name
        asked = req.logprobs_k() is not None
        cmpl_lps = (lambda entries, at: completion_logprobs(tok, entries, at)) if asked else (lambda *_: None)
        if not req.stream:
            texts, reasons, completion, lps = await collect(gen, request)
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": i, "text": t, "logprobs": cmpl_lps(lps[i], 0), "finish_reason": r}
                    for i, (t, r) in enumerate(zip(texts, reasons))
                ],
                "usage": gen.usage(completion),
            }

        chunk = chunker(rid, "text_completion", model)

        async def stream() -> AsyncIterator[str]:
            completion = 0
            offsets = [0] * len(gen.seqs)  # characters of each choice's text sent so far
            async for i, ev in events_or_error(gen):
                if isinstance(ev, str):
                    yield ev
                    return
                if ev.text or ev.finish_reason:
                    lp = cmpl_lps(ev.logprobs or (), offsets[i])
                    offsets[i] += len(ev.text)
                    yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
                if ev.finish_reason:
                    completion += ev.completion_tokens
            if req.include_usage():
                yield chunk([], gen.usage(completion))
            yield sse("[DONE]")

        return CancellingStream(stream(), gen.cancel)

    return app


def run_server(
    served: ServedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 32,
    batch_window_ms: float = 0.0,
    log_level: str = "info",
    *,
    max_kv_tokens: int | None = None,
    compile_model_first: bool = False,
    limits: RequestLimits | None = None,
    allow_unauthenticated: bool = False,
) -> None:
    """Start the engine and serve the API until interrupted. `max_kv_tokens` bounds the KV cache (see `Engine`);
    `compile_model_first` torch.compiles the decode step and warms it up before the server opens (CompileError
    if that fails). A KV budget below the model's context raises ValueError, and so does a `host` other machines
    can reach without an `api_key` unless `allow_unauthenticated`."""
    import uvicorn

    refused = exposure_error(host, api_key, allow_unauthenticated)
    if refused:
        raise ValueError(refused)
    limits = limits or RequestLimits()
    engine = Engine(
        served.model,
        served.tokenizer,
        served.stop_token_ids,
        served.context_length,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        max_kv_tokens=max_kv_tokens,
    )
    per_token = kv_bytes_per_token(served.model)
    if compile_model_first:
        from tuneforge.serve.compile import compile_decode, warm_up

        compile_decode(engine)
        print(
            "torch.compile: compiling the decode step for the shapes serving uses (this takes a while) ...", flush=True
        )
        engine.start()
        try:
            print(f"torch.compile: ready in {warm_up(engine):.0f} s", flush=True)
        except Exception:
            engine.stop()
            raise
    else:
        engine.start()
    app = create_app(served, engine, api_key, limits)
    auth = "API key required" if api_key else "no API key"
    kv = (
        f"KV cache at most {max_kv_tokens} tokens ({max_kv_tokens * per_token / 2**20:.1f} MiB)"
        if max_kv_tokens
        else f"KV cache unbounded ({per_token / 1024:.1f} KiB per token)"
    )
    print(
        f"serving {served.name!r} from {served.source} at http://{host}:{port}/v1 "
        f"(context {served.context_length} tokens, batches of up to {max_batch_size}, {kv}, {auth}; requests "
        f"up to {limits.max_request_bytes} bytes and {limits.max_sequences} sequences)",
        flush=True,
    )
    if not api_key and not is_loopback(host):
        print(
            f"warning: serving on {host} without an API key (--allow-unauthenticated): anyone who can reach port "
            f"{port} can use the model",
            flush=True,
        )
    # the ~400k objects of torch, transformers and the model never die: keep them out of the garbage collector's
    # full collections, which otherwise stall every thread (the event loop too) for ~200 ms now and then
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        gc.unfreeze()  # back to normal for a caller that goes on (tests)
