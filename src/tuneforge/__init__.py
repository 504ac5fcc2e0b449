"""tuneforge: one YAML file drives every stage of fine-tuning a causal language model."""

__version__ = "0.1.0"
