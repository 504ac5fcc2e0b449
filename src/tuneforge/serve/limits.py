"""What one request may ask of the server, and who may reach it.

- Body size: read with a cap (`--max-request-bytes`, default 4 MiB); a larger body is answered 413 and never
  kept (see `read_body`). 4 MiB holds a full 128k-token context in any encoding a client sends: 128k token ids as
  JSON ("151643,") are about 0.9 MB, and text of 128k tokens about 0.5 MB, or ~1 MB of CJK escaped as \\uXXXX.
  Larger bodies are batch jobs: split them.
- Sequences: prompts x `n` per request (`--max-sequences-per-request`, default 256 = 8 full batches at the
  default --max-batch-size 32), answered 400 above it. The engine serves requests in arrival order, so one
  request of 2000 prompts x n=16 would hold every other client back for 1000 batches.
- Prompt length in characters: for tokenizers where every token covers at most L characters of the text
  (`max_chars_per_token`), a text longer than context x L cannot fit, and is refused before it is tokenised.
- Binding: a server reachable from other machines (`--host` other than loopback) needs an API key, or
  `--allow-unauthenticated` to say that the network in front of it is trusted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from tuneforge.serve.protocol import APIError

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_MAX_SEQUENCES = 256
log = logging.getLogger("uvicorn.error")  # printed like uvicorn's own lines


@dataclass(frozen=True)
class RequestLimits:
    """Per-request caps (see the module docstring for the defaults' reasons)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_sequences: int = DEFAULT_MAX_SEQUENCES

    def __post_init__(self):
        for name in ("max_request_bytes", "max_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def check_sequences(self, prompts: int, n: int) -> None:
        """APIError(400) when prompts x n exceeds the cap."""
        if prompts * n > self.max_sequences:
            raise APIError(
                400,
                f"this request asks for {prompts * n} sequences ({prompts} prompt(s) x n={n}); this "
                f"server generates at most {self.max_sequences} per request (--max-sequences-per-request); "
                "send fewer prompts or a lower n, or split the request",
                "n",
                "too_many_sequences",
            )


def _too_large(size: int | None, limit: int) -> APIError:
    got = f"is {size} bytes" if size is not None else f"is over {limit} bytes"
    return APIError(
        413,
        f"the request body {got}; this server accepts at most {limit} bytes per request "
        "(--max-request-bytes); send fewer or shorter prompts, or split the request",
        None,
        "request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes, else APIError(413). A body declared (Content-Length) or found
    (chunked) over the limit is read on and thrown away up to twice the limit, so that clients which read the
    answer only after sending everything (http.client, requests) get the 413; larger ones are answered at once
    and the connection closed. A client that leaves mid-body is logged as one line and answered 499 (which nobody
    receives)."""
    declared = request.headers.get("content-length")
    declared_size = int(declared) if declared is not None and declared.isdigit() else None
    if declared_size is not None and declared_size > 2 * limit:
        raise _too_large(declared_size, limit)
    parts, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
            elif size > 2 * limit:
                break
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning(
            "%s disconnected after %d of %s body bytes of %s %s; request dropped",
            client,
            size,
            declared or "?",
            request.method,
            request.url.path,
        )
        raise APIError(499, "client closed the request", None, "client_closed") from None
    if size > limit:
        raise _too_large(declared_size, limit)
    return b"".join(parts)


# ---------------------------------------------------------------------------- characters per token
_SAFE_NORMALIZERS = {"Prepend"}  # only add characters
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}  # split, never drop


def _keeps_every_char(part: dict | None, safe: set[str]) -> bool:
    """Whether a normalizer / pre-tokenizer (tokenizer.json form) never lowers the character count."""
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        return all(_keeps_every_char(p, safe) for p in part.get("normalizers") or part.get("pretokenizers") or [])
    if kind == "Replace":  # e.g. " " -> "▁"
        pattern = part.get("pattern", {})
        return "String" in pattern and len(part.get("content", "")) >= len(pattern["String"])
    if kind == "Split":
        return part.get("behavior") != "Removed"
    return kind in safe and part.get("behavior") != "Removed"  # Punctuation can be told to drop its matches


def max_chars_per_token(tokenizer) -> int | None:
    """The most characters of text one token can stand for, when that is provable; else None.

    Provable for a fast BPE tokenizer whose normalizer and pre-tokenizer never drop or merge characters
    (none, Prepend, a Replace that does not shorten; ByteLevel, Metaspace, Split that keeps its matches) and
    that has no unknown token swallowing a run of characters (no unk, or byte fallback, or unk per character).
    Then every token spells at most its own length in text (byte-level: one character per byte, and a text
    character is at least one byte; byte-fallback tokens <0xNN> stand for one byte), so at most the longest
    vocabulary entry. Added and special tokens are in the vocabulary, so they count too.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        model = spec["model"]
    except Exception:  # an unusual tokenizer: no shortcut
        return None
    if model.get("type") != "BPE" or not _keeps_every_char(spec.get("normalizer"), _SAFE_NORMALIZERS):
        return None
    if not _keeps_every_char(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS):
        return None
    if model.get("unk_token") is not None and model.get("fuse_unk") and not model.get("byte_fallback"):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    return max((len(t) for t in vocab), default=None) or None


def check_chars(chars: int, context: int, per_token: int | None, what: str) -> None:
    """APIError(400) when `chars` characters cannot fit the context at `per_token` characters per token at most."""
    if per_token is not None and chars > context * per_token:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, but the {what} has {chars} "
            f"characters, more than {context} tokens can hold (at most {per_token} characters per token "
            f"with this tokenizer); shorten the {what}",
            what,
            "context_length_exceeded",
        )


# ---------------------------------------------------------------------------- binding
def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a hostname other than localhost, or "" (every address): it may be reachable
        return False


def exposure_error(host: str, api_key: str | None, allow_unauthenticated: bool) -> str | None:
    """Why serving on `host` without a key is refused (None when allowed)."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return None
    return (
        f"refusing to serve on --host {host or repr(host)} without an API key: other machines could reach the "
        "port and use the model. Set a key with --api-key KEY (or the TUNEFORGE_API_KEY environment variable; "
        "clients send 'Authorization: Bearer KEY'), bind to 127.0.0.1, or pass --allow-unauthenticated if the "
        "network in front of the server is trusted"
    )
