"""Request parsing: what is accepted, and the exact error (status, param, message) for what is not."""

from __future__ import annotations

import json

import pytest

from tuneforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request


def _err(body, schema=ChatCompletionRequest) -> tuple[int, str | None, str]:
    with pytest.raises(APIError) as e:
        parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), schema)
    return e.value.status, e.value.param, e.value.message


def test_accepts_openai_shapes_and_ignores_unknown_fields():
    req = parse_request(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
                ],
                "stop": "END",
                "max_completion_tokens": 7,
                "presence_penalty": 0.5,
                "user": "u1",
            }
        ).encode(),
        ChatCompletionRequest,
    )
    assert [m.as_dict() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert req.stop_strings() == ("END",) and req.token_limit() == 7 and req.temperature == 1.0 and req.n == 1
    comp = parse_request(b'{"prompt": [[1, 2], [3]]}', CompletionRequest)
    assert comp.prompt == [[1, 2], [3]] and comp.token_limit() == 16  # OpenAI's completions default


def test_errors_name_the_parameter_the_value_and_the_rule():
    assert _err(b"{nope") == (
        400,
        None,
        "the request body is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)); send a JSON object",
    )
    assert _err({"messages": [{"role": "user", "content": "x"}], "temperature": -0.1}) == (
        400,
        "temperature",
        "invalid value for temperature: -0.1 (Input should be greater than or equal to 0)",
    )
    assert _err({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}) == (
        400,
        "stop",
        'invalid value for stop: ["a", ""] (stop sequences must be non-empty strings)',
    )
    assert _err({"messages": [{"role": "user", "content": "x"}], "n": 17}) == (
        400,
        "n",
        "invalid value for n: 17 (Input should be less than or equal to 16)",
    )
    assert _err({}, CompletionRequest) == (400, "prompt", "prompt is required")
    assert _err({"prompt": "x", "echo": True}, CompletionRequest) == (
        400,
        "echo",
        "echo=true is not supported by tuneforge serve; leave it unset",
    )
