"""Helpers shared by the data tests."""


def plain(messages: list[dict]) -> list[dict]:
    """Stored messages without their empty tool fields (`tool_calls`, `tool_call_id`: null unless a row has them)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]
