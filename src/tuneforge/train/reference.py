"""The reference model of an objective that compares with one (dpo, ipo, kto): for a LoRA / DoRA run the same
weights with the adapter switched off (no second copy of the model)."""

from __future__ import annotations


def peft_model(model):
    """The peft model inside a DDP / accelerate wrapper (the one with `disable_adapter`)."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model
