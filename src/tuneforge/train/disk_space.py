"""Free disk space for checkpoints: what one needs (estimated before the first is written, measured after), what
the checkpoint directory's file system has free, and the warning when it has less."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# schedule, RNG states, counters and manifest: a few KB; rounded up
SMALL_FILES_BYTES = 256 * 1024


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Bytes of one checkpoint before any is written: the trainable weights as they are stored, plus AdamW's two
    moments per trainable weight (in the weight's dtype, or one byte each for the 8-bit optimizers)."""
    weights = moments = 0
    for p in model.parameters():
        if p.requires_grad:
            n = getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 leaves an empty placeholder
            weights += n * p.element_size()
            moments += 2 * n * (1 if optimizer.endswith("8bit") else p.element_size())
    return weights + moments + SMALL_FILES_BYTES


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a written checkpoint)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def low_space_warning(ckpt_root: Path, need: int, measured: bool) -> str | None:
    """A warning when the file system of `ckpt_root` has less free than one checkpoint needs, else None."""
    free = free_bytes(ckpt_root)
    if free >= need:
        return None
    how = "the size of the last one written" if measured else "estimated: trainable weights + optimizer state"
    return (
        f"warning: only {gb(free)} free on the file system of {ckpt_root}, and a checkpoint needs about "
        f"{gb(need)} ({how}): checkpoint saves will fail (the run goes on, keeping the last good one). Free space "
        "there, lower checkpoint.save_total_limit, or set output.dir to a larger disk"
    )
