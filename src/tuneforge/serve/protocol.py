"""The OpenAI wire format the server accepts and the error body it answers with.

Requests are validated here (pydantic) so that every bad request becomes a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` naming the parameter, the value and the fix. Unknown
extra fields are ignored (clients send many optional ones); fields that would change the answer but are not
implemented (logprobs, echo, tools, ...) are refused rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16
MAX_STOP = 4
# pydantic names the union member tried in an error location (prompt.list[int].2); clients know only the field
UNION_MEMBER_LOCS = {"str", "list[str]", "list[int]", "list[list[int]]", "list[ContentPart]"}


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON with this HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self) -> None:
        if self.logprobs not in (None, False):
            raise APIError(
                400,
                f"logprobs={self.logprobs!r} is not supported by tuneforge serve; leave it unset",
                "logprobs",
                "unsupported_parameter",
            )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        """{"role", "content"} with text parts joined; "developer" is the newer name of "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(
                400, "tools are not supported by tuneforge serve; leave them unset", "tools", "unsupported_parameter"
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(
                400, "echo=true is not supported by tuneforge serve; leave it unset", "echo", "unsupported_parameter"
            )

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse_request(raw: bytes, schema: type[_Request]) -> _Request:
    """The request body as `schema`, or an APIError(400) naming the parameter, the value and the rule."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(
            400, f"the request body is not valid JSON ({e}); send a JSON object", None, "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(x) for x in err["loc"] if x not in UNION_MEMBER_LOCS)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            raise APIError(400, f"{param} is required", param, "missing_required_parameter") from None
        raise APIError(
            400, f"invalid value for {param}: {json.dumps(err.get('input'))[:200]} ({msg})", param, "invalid_value"
        ) from None
    req.refuse_unsupported()
    return req
