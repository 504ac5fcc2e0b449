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

import os

from tuneforge.config.schema import RunConfig
from tuneforge.train.fsdp import FSDP2
from tuneforge.train.replicated import ParallelError, Replicated


def _deepspeed(*args):
    from tuneforge.train.zero import (
        DeepSpeed,  # deepspeed is an optional extra: imported only when chosen
    )

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
                + (" (dist.deepspeed_config=your.json)" if what == "deepspeed" else "")
            )
    return STRATEGIES[name](accelerator, cfg, precision, device)
