"""Helpers shared by the data tests."""

# one OpenAI function schema and a call of it, for the tool-call tests
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = [{"id": "call00000", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def plain(messages: list[dict]) -> list[dict]:
    """Stored messages without their empty tool fields (`tool_calls`, `tool_call_id`: null unless a row has them)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]
