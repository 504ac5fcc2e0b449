"""Throughput accounting: model FLOPs per step, MFU against a device peak, and peak memory.

FLOPs are the ones the model needs, counted from its shapes (not measured): a matmul with a weight of
n parameters costs 2n FLOPs per token forward. Backward costs 2n for the input gradient plus 2n for
the weight gradient, the latter only where the weight trains (LoRA: only the adapters). Attention
adds 4 * layers * hidden * (tokens attended) per token forward (scores and weighted sum; causal, so
a token at position p attends to p + 1 positions). The LM head counts only at trained positions when
tuneforge computes logits only there.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    body_params: int  # matmul weights in the transformer blocks (no embeddings, no LM head)
    trainable_body: int  # of which train (full: all; LoRA: ~0, the adapters are counted in adapter_params)
    adapter_params: int  # LoRA/DoRA matrices (always trained)
    head_params: int  # LM head weight (hidden x vocab)
    head_trains: bool
    layers: int
    hidden: int

    def step_flops(self, tokens: int, trained_positions: int, attended: int, head_positions: int) -> float:
        """FLOPs of one forward+backward over `tokens` tokens; `attended` = sum over tokens of positions attended."""
        fwd_body = 2 * (self.body_params + self.adapter_params) * tokens
        bwd_body = (
            2 * (self.body_params + self.adapter_params) * tokens
            + 2 * (self.trainable_body + self.adapter_params) * tokens
        )
        attn = 4 * self.layers * self.hidden * attended
        head = 2 * self.head_params * head_positions * (3 if self.head_trains else 2)
        return float(fwd_body + bwd_body + 3 * attn + head)


def flop_model(model: torch.nn.Module) -> FlopModel:
    """Count the matmul parameters of a (peft-wrapped) causal LM by role."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    head = inner.get_output_embeddings()
    embed = inner.get_input_embeddings()
    head_weights = {id(p) for p in head.parameters()} if head is not None else set()
    embed_weights = {id(p) for p in embed.parameters()} if embed is not None else set()
    body = trainable_body = adapters = 0
    for name, p in model.named_parameters():
        if id(p) in head_weights or id(p) in embed_weights or p.ndim < 2:
            continue
        if "lora_" in name:
            adapters += p.numel()
            continue
        body += p.numel()
        trainable_body += p.numel() if p.requires_grad else 0
    cfg = getattr(inner, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    head_params = head.weight.numel() if head is not None else 0
    head_trains = bool(head is not None and head.weight.requires_grad)
    return FlopModel(body, trainable_body, adapters, head_params, head_trains, layers, hidden)


# ---------------------------------------------------------------------------- device peak
# dense tensor-core peaks (TFLOP/s) for common GPUs in the training dtype; the user may set train.peak_tflops
GPU_PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0,
    ("H100", "fp16"): 989.0,
    ("H200", "bf16"): 989.0,
    ("H200", "fp16"): 989.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp16"): 312.0,
    ("L4", "bf16"): 121.0,
    ("L40S", "bf16"): 362.0,
    ("A10", "bf16"): 125.0,
    ("V100", "fp16"): 125.0,
    ("T4", "fp16"): 65.0,
    ("RTX 4090", "bf16"): 165.0,
    ("H100", "fp32"): 67.0,
    ("A100", "fp32"): 19.5,
}


def measure_matmul_tflops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3
) -> float:
    """Measured dense matmul throughput of this device (TFLOP/s): the practical peak for MFU on CPUs."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e12


def device_peak_tflops(device: str, precision: str, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from)."""
    if configured:
        return configured, "train.peak_tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for (gpu, prec), peak in GPU_PEAK_TFLOPS.items():
            if gpu in name and prec == precision:
                return peak, f"{gpu} {prec} datasheet"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        return measure_matmul_tflops("cuda", dtype, 4096), "measured matmul"
    return _cpu_peak_tflops(torch.get_num_threads()), "measured fp32 matmul, best of 4 bursts"


@functools.cache
def _cpu_peak_tflops(threads: int) -> float:
    """Measured once per process and thread count (a process that trains several models measures once).
    The best of several short bursts at two sizes: small matmuls run faster on CPUs (cache), and a burst is
    easily slowed by another process; a peak measured too low would inflate MFU (MfuMeter bounds what remains)."""
    return max(measure_matmul_tflops("cpu", size=size, seconds=0.1) for size in (512, 1024, 512, 1024))


class MfuMeter:
    """Model FLOPs utilisation of each step: achieved model FLOP/s per process / the device's peak.

    A peak measured at start-up is a lower bound of what the device can do: another process may have been
    using the cores at that moment (the quickstart once printed MFU 164-180% that way), and a configured
    `train.peak_tflops` can be wrong. A step that achieves more than the peak is itself the better
    measurement, so the peak rises to it: MFU is never above 100%, and the first time it happens `update`
    returns a note saying so (the loop logs it once)."""

    def __init__(self, peak_tflops: float, source: str, processes: int = 1):
        self.peak, self.source, self.processes = peak_tflops, source, max(1, processes)
        self._noted = False

    def update(self, flops: float, seconds: float) -> tuple[float, str | None]:
        """(MFU of a step of `flops` model FLOPs over all processes taking `seconds`, a note or None)."""
        achieved = flops / max(seconds, 1e-12) / self.processes / 1e12
        if achieved <= self.peak:
            return achieved / self.peak, None
        note = None
        if not self._noted:
            fix = (
                "set train.peak_tflops to the device's real peak"
                if self.source == "train.peak_tflops"
                else "the cores were probably busy while it was measured"
            )
            note = (
                f"MFU: a step reached {achieved:.3g} TFLOP/s per process, above the peak of {self.peak:.3g} "
                f"({self.source}); MFU is now measured against {achieved:.3g} ({fix})"
            )
            self._noted = True
        self.peak = achieved
        return 1.0, note


# ---------------------------------------------------------------------------- memory
def peak_memory_gb(device: str) -> float:
    """Peak CUDA allocator memory, or this process's peak resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


def default_threads(num_processes: int) -> int:
    """CPU threads per process: the cores this process may use, shared by the local processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, num_processes))
