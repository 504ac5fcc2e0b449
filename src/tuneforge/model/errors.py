"""The model stage's error: what could not be loaded, why, and what to do."""

from tuneforge.errors import TuneforgeError


class ModelLoadError(TuneforgeError, RuntimeError):
    """The model could not be loaded; the message says why and what to do."""
