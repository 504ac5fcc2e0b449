"""DeepSpeed ZeRO 1/2/3 (+ CPU offload) as a `dist.strategy` (see parallel.py for the interface): the engine
comes from `deepspeed.initialize`, the config from deepspeed_config.py, the optimizer and schedule from train.*."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.train.replicated import ParallelError, Replicated, ensure_process_group


def import_deepspeed():
    """deepspeed picks its accelerator at import: on a machine without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ParallelError(
            f"dist.strategy=deepspeed: deepspeed cannot be imported ({e}); pip install 'tuneforge[deepspeed]'"
        ) from None
    if not torch.cuda.is_available():
        # on a CPU DeepSpeed JIT-compiles a shared-memory all-reduce (C++ compiler, a minute or more, per machine)
        # that only its inference path uses; training communicates through torch.distributed (gloo)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeed(Replicated):
    """DeepSpeed ZeRO through `deepspeed.initialize`, with tuneforge's optimizer and schedule as the client's."""

    name = "deepspeed"

    def __init__(self, accelerator, cfg: RunConfig, precision: str, device: str):
        super().__init__(accelerator, cfg, precision, device)
        from tuneforge.train.deepspeed_config import build_deepspeed_config

        self.ds_config, self.notes = build_deepspeed_config(cfg, precision, self.world, _hidden_size(cfg))
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.sharded = self.stage == 3
        self._hf_ds_config = None

    def before_load(self) -> None:
        if self.stage == 3 and self.cfg.model.init is None:
            # ZeRO-3: weights are partitioned while from_pretrained loads them (no rank holds the whole model)
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            deepspeed = import_deepspeed()
            ensure_process_group(self.device)
            # DeepSpeed's own view of the process group (its config checks the batch sizes against the world size)
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # kept alive: transformers holds a weak reference

    def wrap(self, model, make_optimizer: Callable, make_scheduler: Callable):
        deepspeed = import_deepspeed()
        ensure_process_group(self.device)
        optimizer = make_optimizer(model)
        # the schedule is built on the client optimizer: ZeRO keeps its param_groups (and their lr), and the
        # engine steps the schedule at each accumulation boundary
        scheduler = make_scheduler(optimizer)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self.model, self.optimizer, self.scheduler = engine, ds_optimizer, ds_scheduler or scheduler
        return self.model, self.optimizer, self.scheduler

    @property
    def wrapper(self) -> str:
        return f"{type(self.model).__name__}(ZeRO-{self.stage})"

    def module(self) -> torch.nn.Module:
        return self.model.module

    def micro_batch(self, sync: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary from its micro-step count

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # scale_wrt_gas=False: the loss is already divided by the step's trained tokens
        self.model.backward(loss, scale_wrt_gas=False)
        if not last:
            self.model.step()  # bookkeeping only: not an accumulation boundary

    def update(self, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        if not loss_finite and self.precision != "fp16":
            # ZeRO has already reduced this step's gradients into its partitions; it cannot drop them
            from tuneforge.train.signals import BadStepsError

            raise BadStepsError(
                "non-finite loss under dist.strategy=deepspeed, which cannot skip a step's gradients "
                "without an fp16 loss scaler; resume from the last checkpoint with a lower train.lr"
            )
        # the boundary step: DeepSpeed clips (gradient_clipping), steps the optimizer and the schedule, zeroes grads
        self.model.step()
        norm = self.model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        return grad_norm, not self.model.was_step_applied()

    def local_fraction(self) -> float:
        params = list(self.model.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return local / max(1, total)

    def close(self) -> None:
        self.model.destroy()  # ZeRO-3's parameter hooks and prefetch state

    def checkpoint_layout(self) -> str:
        # ZeRO partitions are laid out for one world size and stage
        return f"deepspeed zero-{self.stage} x{self.world}"

    def save_shards(self, directory: Path) -> None:
        self.model.save_checkpoint(
            str(directory), tag="zero", save_latest=False, exclude_frozen_parameters=self.cfg.adapter.type != "full"
        )

    def load_shards(self, directory: Path, weights_only: bool = False) -> None:
        path, _ = self.model.load_checkpoint(
            str(directory),
            tag="zero",
            load_module_strict=self.cfg.adapter.type == "full",
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
        if path is None:
            raise ParallelError(f"{directory}: DeepSpeed found no checkpoint to load (tag 'zero')")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.stage < 3:
            return None  # ZeRO-1/2 keep whole parameters on every rank
        # ZeRO-3: gathered one module at a time onto rank 0 (collective; None on the other ranks)
        return self.model._zero3_consolidated_16bit_state_dict() or {}


def _hidden_size(cfg: RunConfig) -> int | None:
    """The model's hidden size (DeepSpeed's bucket sizes follow it), without loading any weights."""
    if cfg.model.init is not None:
        return cfg.model.init.hidden_size
    try:
        from tuneforge.model.load import pretrained_config

        config = pretrained_config(cfg.model)
    except Exception:  # noqa: BLE001 - the bucket sizes then keep DeepSpeed's defaults; loading reports real errors
        return None
    return getattr(config, "hidden_size", None)
