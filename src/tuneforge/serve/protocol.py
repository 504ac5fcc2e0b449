"""The OpenAI wire format the server accepts and the error body it answers with.

Requests are validated here (pydantic) so that every bad request becomes a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` naming the parameter, the value and the fix. Unknown
extra fields are ignored (clients send many optional ones); fields that would change the answer but are not
implemented (echo) are refused rather than silently ignored. Tools follow OpenAI's function-calling
form (`tools`, `tool_choice`, assistant `tool_calls`, `role: tool` results); what the server does with them is in
infer/tool_parsing.py and docs/deploy.md.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 20
# pydantic names the union member tried in an error location (prompt.list[int].2); clients know only the field
UNION_MEMBER_LOCS = {
    "str",
    "list[str]",
    "list[int]",
    "list[list[int]]",
    "list[ContentPart]",
    "NamedToolChoice",
    "literal['auto','none','required']",
    "dict[str,any]",
}


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
        pass

    def logprobs_k(self) -> int | None:
        """None when no log-probabilities are asked for, else how many top alternatives per token."""
        return None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSchema


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        """{"role", "content"} with text parts joined ("developer" is the newer name of "system"), an assistant's
        `tool_calls` and a tool result's `tool_call_id` kept (the form data/tool_calls.py `for_template` takes)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true; send both or neither", "top_logprobs", "invalid_value"
            )
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise APIError(400, f"tools name a function twice: {names}; give each a distinct name", "tools")
        choice = self.tool_choice
        if choice not in (None, "auto", "none") and not names:
            raise APIError(
                400,
                "tool_choice requires tools: send the functions in `tools` or leave tool_choice unset",
                "tool_choice",
                "invalid_value",
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {choice.function.name!r}, which is not in tools ({names}); "
                "name one of the tools",
                "tool_choice",
                "invalid_value",
            )
        for i, m in enumerate(self.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise APIError(
                    400,
                    f"messages[{i}] has role 'tool' without tool_call_id; send the id of the call it answers",
                    f"messages.{i}.tool_call_id",
                    "missing_required_parameter",
                )
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages have tool_calls", f"messages.{i}")

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def offered_tools(self) -> list[dict] | None:
        """The tools the model is shown (OpenAI form): none for tool_choice 'none', only the named one for a named
        choice, else all of them."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tools

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_k(self) -> int | None:
        return self.logprobs

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
