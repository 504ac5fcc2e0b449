"""Export a run: merge its adapter into the base, write a Hugging Face directory, check logit parity."""

from tuneforge.export.merge import ExportError, ExportParityError, ExportResult, export_run
from tuneforge.export.parity import THRESHOLDS, ParityCheck

__all__ = ["THRESHOLDS", "ExportError", "ExportParityError", "ExportResult", "ParityCheck", "export_run"]
