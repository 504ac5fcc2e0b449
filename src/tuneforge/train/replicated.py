"""The strategy interface every `dist.strategy` implements (see parallel.py), and its plain form: one process,
or DDP through accelerate, every rank holding the whole model."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig

# what a checkpoint written by each strategy holds; resuming needs the same layout (see checkpoint.py)
LAYOUT_FULL = "full"  # trainable.safetensors + optimizer.pt: any world size, any replicated strategy
LAYOUT_DCP = "dcp"  # torch.distributed.checkpoint shards: any world size (DCP reshards on load)


class ParallelError(ConfigError):
    """A strategy cannot run as configured; the message says why and what to change (exit code 2, no traceback)."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes the model lists in `_no_split_modules`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ParallelError(
            f"dist.strategy=fsdp2: no decoder layers found in {type(inner).__name__} (its "
            "_no_split_modules is empty); use dist.strategy=ddp or deepspeed for this model"
        )
    return layers


def ensure_process_group(device: str) -> None:
    """FSDP2 and DeepSpeed need torch.distributed even on one process (accelerate starts none for a single one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from tuneforge.train.launch import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads them from the environment
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


class Replicated:
    """One process, or DDP (accelerate prepares the model; DistributedDataParallel with several processes)."""

    name = "ddp"
    sharded = False  # True when a forward pass is collective (every rank must run it)
    layout = LAYOUT_FULL

    def __init__(self, accelerator, cfg: RunConfig, precision: str, device: str):
        self.acc, self.cfg, self.precision, self.device = accelerator, cfg, precision, device
        self.world = accelerator.num_processes

    def before_load(self) -> None:
        """Called before the model is loaded (DeepSpeed ZeRO-3 partitions weights while loading)."""

    def wrap(self, model, make_optimizer: Callable, make_scheduler: Callable):
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        return self.model, self.optimizer, self.scheduler

    @property
    def wrapper(self) -> str:
        return type(self.model).__name__

    def module(self) -> torch.nn.Module:
        """The model itself (peft or transformers), for evaluation, generation and saving. (Not accelerate's
        unwrap_model: with deepspeed installed, it imports deepspeed and with it mlflow, a second at the first
        checkpoint of every run.)"""
        model = self.model
        while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model._orig_mod
        return model

    def micro_batch(self, sync: bool):
        """Context for one micro-batch's forward/backward; gradients are communicated only when `sync`."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.acc.backward(loss)

    def generation(self):
        """Context for `generate()` (which calls the inner model's forward, not the wrapper's)."""
        return contextlib.nullcontext()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def zero_gradients(self) -> None:
        """Gradients of zero where none were computed: an update none of whose micro-batches ran a backward (GRPO
        with every advantage 0) steps the optimizer as a zero gradient does (Adam's moments and weight decay go on),
        not as no gradient (the parameter skipped)."""
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def update(self, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        """Clip, step the optimizer (unless the loss or gradient is not finite) and the schedule; clear the
        gradients. Returns (gradient norm before clipping, skipped)."""
        grad_norm = float(self.acc.clip_grad_norm_(self._params(), max_norm if max_norm is not None else math.inf))
        skipped = not (loss_finite and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def close(self) -> None:
        """Release what the engine holds (hooks, threads) before the process group goes."""

    # ---- checkpoints: None = the loop's own files (trainable.safetensors + optimizer.pt, written by rank 0)
    save_shards: Callable[[Path], None] | None = None
    load_shards: Callable[[Path, bool], None] | None = None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every weight, gathered on rank 0 (collective for sharded strategies); None = the module's own."""
        return None

    def checkpoint_layout(self) -> str:
        return self.layout

    def local_fraction(self) -> float:
        """Share of the model's parameter elements this rank holds (1.0 replicated, ~1/world fully sharded): the
        proof that a sharded strategy really shards."""
        return 1.0
