"""AdamW with decoupled weight decay on matrices only, and a warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from tuneforge.config.schema import TrainConfig

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))
    import bitsandbytes as bnb  # the config check made sure it is installed

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return get_scheduler(
        SCHEDULES[cfg.scheduler],
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (`nn.Module.compile`): parameter names, peft wrappers and hooks
    stay as they are, only the layers' forward runs compiled. Returns how many layers were compiled."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"train.compile: no decoder layers found in {type(model).__name__}; set train.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
