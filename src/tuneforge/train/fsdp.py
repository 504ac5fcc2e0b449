"""FSDP2 as a `dist.strategy` (see parallel.py for the interface): PyTorch's `fully_shard` on each decoder layer,
then the root; parameters, gradients and optimizer state sharded over the ranks (DTensors); checkpoints through
torch.distributed.checkpoint."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.train.replicated import LAYOUT_DCP, ParallelError, Replicated, decoder_layers, ensure_process_group


class FSDP2(Replicated):
    """`torch.distributed.fsdp.fully_shard` per decoder layer, then the root, on a 1-D device mesh over all ranks."""

    name = "fsdp2"
    sharded = True
    layout = LAYOUT_DCP

    def wrap(self, model, make_optimizer: Callable, make_scheduler: Callable):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        d = self.cfg.dist
        ensure_process_group(self.device)
        if self.precision == "fp16":
            raise ParallelError(
                "dist.strategy=fsdp2 with fp16 needs a sharded gradient scaler, which tuneforge does "
                "not wire; set train.precision=bf16 (or fp32), or use dist.strategy=ddp/deepspeed"
            )
        if self.device == "cuda":
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        mesh = init_device_mesh(self.device, (self.world,))
        if self.precision == "bf16":
            # compute in bf16, master weights (and the optimizer) in fp32, gradients reduced in fp32 by default
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            mp = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16,
                reduce_dtype=torch.float32 if d.fsdp_reduce_dtype == "fp32" else torch.bfloat16,
            )
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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        return get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its own shards of the trainable weights and the optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))

    def load_shards(self, directory: Path, weights_only: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        model_sd, optim_sd = self._state()
        state = {"model": model_sd} if weights_only else {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))  # reshards to this world size
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        if weights_only:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state["model"], options=options)
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=options,
            )

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # gathered layer by layer into CPU memory of rank 0 (the other ranks get an empty dict)
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
