"""How the model is spread over processes: `dist.strategy` -> one small interface the training loop calls.

  Replicated  one process, or DDP through accelerate: every rank holds the whole model
  FSDP2       PyTorch's `fully_shard` on each decoder layer, then the root: parameters, gradients and
              optimizer state sharded over the ranks (DTensors); checkpoints through torch.distributed.checkpoint
  DeepSpeed   ZeRO 1/2/3 (+ CPU offload) through `deepspeed.initialize`; checkpoints through the engine (zero.py)

The engines do the work (none of this re-implements sharding or communication). What they share: gradients
are averaged over ranks, so the loop backpropagates `nll * world / step_tokens` and one optimizer update
equals the update of one process over the same global batch.

`accelerate`'s own FSDP integration is not used: on a CPU it silently falls back to DDP (see FIELD-NOTES),
and FSDP that silently isn't is the failure this module exists to prevent. Each engine reports the wrapper
it really built (`wrapper`), which the run summary records and the tests assert.
"""

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
        raise ParallelError(f"dist.strategy=fsdp2: no decoder layers found in {type(inner).__name__} (its "
                            "_no_split_modules is empty); use dist.strategy=ddp or deepspeed for this model")
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


class FSDP2(Replicated):
    """`torch.distributed.fsdp.fully_shard` per decoder layer, then the root, on a 1-D device mesh over all ranks."""

    name = "fsdp2"
    sharded = True
    layout = LAYOUT_DCP

    def wrap(self, model, make_optimizer: Callable, make_scheduler: Callable):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        d = self.cfg.dist
        ensure_process_group(self.device)
        if self.precision == "fp16":
            raise ParallelError("dist.strategy=fsdp2 with fp16 needs a sharded gradient scaler, which tuneforge does "
                                "not wire; set train.precision=bf16 (or fp32), or use dist.strategy=ddp/deepspeed")
        if self.device == "cuda":
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        mesh = init_device_mesh(self.device, (self.world,))
        if self.precision == "bf16":
            # compute in bf16, master weights (and the optimizer) in fp32, gradients reduced in fp32 by default
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=torch.float32 if d.fsdp_reduce_dtype == "fp32" else torch.bfloat16)
        else:
            mp = MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=self.device == "cuda") if d.offload_optimizer else OffloadPolicy()
        kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=d.fsdp_reshard_after_forward)
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        self.model = model
        self.optimizer = make_optimizer(model)  # built on the sharded parameters (DTensors)
        self.scheduler = make_scheduler(self.optimizer)
        return self.model, self.optimizer, self.scheduler

    def module(self) -> torch.nn.Module:
        return self.model

    @contextlib.contextmanager
    def generation(self):
        # peft's and transformers' generate() call the inner model, so the root's hooks never gather its own
        # parameters (embeddings, final norm, LM head): gather them for the duration; the layers gather themselves
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def micro_batch(self, sync: bool):
        # no reduce-scatter until the last micro-batch of the step (gradients accumulate unsharded meanwhile)
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def update(self, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        from torch.distributed.tensor import DTensor

        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):  # a partial sum over the shards: reduce it to the global norm
            norm = norm.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        grad_norm = float(norm)
        skipped = not (loss_finite and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def local_fraction(self) -> float:
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        return local / max(1, sum(p.numel() for p in params))

    def _state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its own shards of the trainable weights and the optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))

    def load_shards(self, directory: Path, weights_only: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd = self._state()
        state = {"model": model_sd} if weights_only else {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))  # reshards to this world size
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        if weights_only:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state["model"], options=options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=options)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # gathered layer by layer into CPU memory of rank 0 (the other ranks get an empty dict)
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _deepspeed(*args):
    from tuneforge.train.zero import DeepSpeed  # deepspeed is an optional extra: imported only when chosen

    return DeepSpeed(*args)


STRATEGIES = {"ddp": Replicated, "fsdp2": FSDP2, "deepspeed": _deepspeed}


def build_parallel(accelerator, cfg: RunConfig, precision: str, device: str) -> Replicated:
    """The strategy `dist.strategy` names (auto = DDP, or a single process)."""
    name = cfg.dist.strategy if cfg.dist.strategy != "auto" else "ddp"
    for env, what in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp2")):
        if os.environ.get(env, "").lower() in ("1", "true", "yes"):
            raise ParallelError(
                f"started by an accelerate config that turns on {what} ({env}=true): tuneforge chooses the engine "
                f"from the run config instead. Launch with a plain multi-process accelerate config (e.g. "
                f"configs/accelerate/multi_gpu.yaml) and set dist.strategy={what}"
                + (" (dist.deepspeed_config=your.json)" if what == "deepspeed" else ""))
    return STRATEGIES[name](accelerator, cfg, precision, device)
