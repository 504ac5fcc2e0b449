"""Serving a trained run: an OpenAI-compatible HTTP API (`server`, needs the `serve` extra) and a terminal
chat (`chat`), both generating through the continuous-batching `engine`."""

SERVE_EXTRA_HINT = "pip install 'tuneforge[serve]'"


def missing_serve_deps() -> list[str]:
    """The HTTP-serving packages that cannot be imported (fastapi, uvicorn)."""
    import importlib

    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing
