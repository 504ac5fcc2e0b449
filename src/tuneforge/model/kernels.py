"""Optional fused GPU kernels: Liger (Triton) RMSNorm, RoPE and SwiGLU in place of transformers' modules.

Only the layers change; the LM head and loss stay tuneforge's (`train.logits`), so Liger's own fused
cross-entropy, which needs the labels inside the model's forward, is not used. Liger kernels run only on
CUDA; on any other device, or without the package, the run stops before loading weights with what to do.
"""

from __future__ import annotations

import torch

from tuneforge.config.load import ConfigError

LIGER_KERNELS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


def check_liger(device: str) -> None:
    """Raise with the fix when train.liger_kernels cannot run here."""
    if device != "cuda":
        raise ConfigError(
            f"train.liger_kernels: Liger kernels are Triton kernels for CUDA GPUs and this run is on "
            f"{device}; set train.liger_kernels=false"
        )
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"train.liger_kernels needs the liger-kernel package ({e}); install it with "
            "`pip install 'tuneforge[liger]'` or set train.liger_kernels=false"
        ) from e


def apply_liger(model: torch.nn.Module, device: str) -> str:
    """Patch a transformers model instance (before adapters wrap its linears); returns what was applied."""
    check_liger(device)
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(
            f"train.liger_kernels: liger-kernel has no kernels for model type {model_type!r} (it "
            f"supports {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set train.liger_kernels=false"
        )
    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
    return f"Liger kernels ({', '.join(k for k, on in LIGER_KERNELS.items() if on)}) for {model_type}"
