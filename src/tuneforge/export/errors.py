"""What can go wrong in export, one class per kind (merge.py, gguf_file.py and gguf_tokenizer.py raise them)."""

from __future__ import annotations

from tuneforge.errors import TuneforgeError
from tuneforge.export.parity import ParityCheck


class ExportError(TuneforgeError, RuntimeError):
    """The run could not be exported; the message says why and what to do."""


class ExportParityError(ExportError):
    """The exported model's logits differ from base + adapter beyond the thresholds; nothing was written."""

    def __init__(self, message: str, checks: list[ParityCheck]):
        super().__init__(message)
        self.checks = checks


class GGUFExportError(ExportError):
    """The model or its tokenizer cannot be written as GGUF; the message says why and what to do instead."""


class GGUFCheckError(GGUFExportError):
    """The GGUF file read back differs from its source; the file was removed."""
