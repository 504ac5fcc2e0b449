"""The DeepSpeed JSON for a run: a shipped or user file with its "auto" values filled from the tuneforge config.

Filled like the Hugging Face integration does (so configs written for the HF Trainer, the seed's
ZeRO-2 file included, work as given): batch sizes and accumulation, gradient clipping, fp16/bf16, and the
bucket sizes that depend on the hidden size. An explicit value that contradicts the tuneforge config is
an error naming both keys, because it would silently change the numbers. The "optimizer" and
"scheduler" sections are replaced by tuneforge's (train.optimizer, train.lr, train.scheduler), which the
notes say, so every strategy trains with the same update rule.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig

AUTO = "auto"


class DeepSpeedConfigError(ConfigError):
    """The DeepSpeed JSON cannot be used with this run; the message names the key and the fix."""


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DeepSpeedConfigError(f"dist.deepspeed_config: cannot read {path} ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"dist.deepspeed_config: {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"dist.deepspeed_config: {path} must hold a JSON object")
    return data


def _fill(section: dict, key: str, value, where: str, source: str) -> None:
    """section[key] = value when missing or "auto"; an explicit different value is an error."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value and not (
        isinstance(value, float)
        and isinstance(current, (int, float))
        and abs(current - value) <= 1e-12 * max(1.0, abs(value))
    ):
        raise DeepSpeedConfigError(
            f"dist.deepspeed_config: {where}{key} = {current!r} but the tuneforge config gives {value!r} ({source}); "
            f'set it to "auto" (or to {value!r}) in the JSON, or change {source}'
        )


def build_deepspeed_config(
    cfg: RunConfig, precision: str, world: int, hidden_size: int | None = None
) -> tuple[dict, list[str]]:
    """(the DeepSpeed config dict, notes for the log)."""
    d, t = cfg.dist, cfg.train
    notes: list[str] = []
    # without a JSON: bucket sizes and the ZeRO-3 persistence threshold follow the hidden size, as "auto" does
    ds = (
        copy.deepcopy(read_json(d.deepspeed_config))
        if d.deepspeed_config
        else {
            "zero_optimization": {
                "reduce_bucket_size": AUTO,
                "stage3_prefetch_bucket_size": AUTO,
                "stage3_param_persistence_threshold": AUTO,
            }
        }
    )
    where = f"{d.deepspeed_config}: " if d.deepspeed_config else ""
    for section in ("optimizer", "scheduler"):
        if section in ds:
            ds.pop(section)
            notes.append(f"the JSON's \"{section}\" section is replaced by tuneforge's train.* settings")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, where, "train.grad_accum")
    _fill(
        ds,
        "train_batch_size",
        t.micro_batch_size * t.grad_accum * world,
        where,
        f"train.micro_batch_size x train.grad_accum x {world} processes",
    )
    # DeepSpeed clips at 1.0 unless told otherwise; 0 = no clipping (train.max_grad_norm: null)
    _fill(ds, "gradient_clipping", float(t.max_grad_norm or 0.0), where, "train.max_grad_norm")
    for kind in ("fp16", "bf16"):
        sec = ds.setdefault(kind, {})
        if not isinstance(sec, dict):
            raise DeepSpeedConfigError(
                f'dist.deepspeed_config: {where}{kind} must be an object like {{"enabled": "auto"}}'
            )
        _fill(sec, "enabled", precision == kind, f"{where}{kind}.", f"train.precision (resolved to {precision})")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", AUTO)
    if stage == AUTO:
        zero["stage"] = d.zero_stage or 2
    elif d.zero_stage is not None and d.zero_stage != stage:
        raise DeepSpeedConfigError(
            f"dist.deepspeed_config: {where}zero_optimization.stage = {stage} but dist.zero_stage "
            f"= {d.zero_stage}; remove one of them"
        )
    if zero["stage"] not in (1, 2, 3):
        raise DeepSpeedConfigError(
            f"dist.deepspeed_config: {where}zero_optimization.stage must be 1, 2 or 3 (got "
            f"{zero['stage']}); stage 0 is plain data parallelism: use dist.strategy=ddp"
        )
    if d.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    if d.offload_params:
        if zero["stage"] != 3:
            raise DeepSpeedConfigError(
                f"dist.offload_params needs ZeRO-3; the DeepSpeed config has stage {zero['stage']}"
            )
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": False})
    if hidden_size:
        for key, value in (
            ("reduce_bucket_size", hidden_size * hidden_size),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
            ("stage3_param_persistence_threshold", 10 * hidden_size),
        ):
            if zero.get(key) == AUTO:
                zero[key] = value
    for key, value in list(zero.items()):
        if value == AUTO:  # bucket sizes without a known hidden size: DeepSpeed's own defaults
            del zero[key]
    offloading = any(
        zero.get(k, {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param")
    )
    if offloading:
        # tuneforge's torch AdamW runs on the offloaded fp32 partitions (DeepSpeedCPUAdam needs a compiled op)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)  # tuneforge logs the steps
    ds.setdefault("wall_clock_breakdown", False)
    leftover = sorted(_autos(ds))
    if leftover:
        raise DeepSpeedConfigError(
            f'dist.deepspeed_config: {where}tuneforge cannot fill "auto" for {", ".join(leftover)}; '
            "give explicit values"
        )
    return ds, notes


def _autos(obj, prefix: str = "") -> list[str]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _autos(v, f"{prefix}{k}.")
    elif obj == AUTO:
        out.append(prefix.rstrip("."))
    return out


def zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage a deepspeed run will use: dist.zero_stage, else its JSON's, else 2."""
    if cfg.dist.zero_stage:
        return cfg.dist.zero_stage
    if cfg.dist.deepspeed_config:
        stage = read_json(cfg.dist.deepspeed_config).get("zero_optimization", {}).get("stage", 2)
        return stage if stage in (1, 2, 3) else 2
    return 2
