"""Export a run: merge its adapter into the base, write a Hugging Face directory, check logit parity;
optionally a GGUF file for llama.cpp / Ollama (`tuneforge.export.gguf_file`, needs the gguf extra)."""

from tuneforge.export.errors import ExportError, ExportParityError, GGUFCheckError, GGUFExportError
from tuneforge.export.merge import ExportResult, export_run
from tuneforge.export.parity import THRESHOLDS, ParityCheck

__all__ = [
    "THRESHOLDS",
    "ExportError",
    "ExportParityError",
    "ExportResult",
    "GGUFCheckError",
    "GGUFExportError",
    "ParityCheck",
    "export_run",
]
