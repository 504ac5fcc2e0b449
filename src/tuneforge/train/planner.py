"""Peak training memory per device, estimated before anything is loaded: `tuneforge plan CONFIG`.

The parts of a step's peak, per device:
- weights: frozen ones in their storage dtype (4-bit QLoRA linears: 0.5 byte + quantisation constants),
  trainable ones in fp32 (tuneforge keeps trainable weights in fp32 and autocasts the compute);
- gradients: fp32, one per trainable weight;
- optimizer: AdamW's two fp32 moments per trainable weight (8-bit optimizers: two bytes);
- activations: what autograd keeps for backward. Not guessed from a formula: one decoder layer of the
  real architecture runs forward on the `meta` device (shapes only, no memory, milliseconds) under
  `saved_tensors_hooks`, which sees exactly the tensors the layer saves; times the number of layers
  (with gradient checkpointing: each layer's input, plus one layer recomputed in backward);
- LM head and loss: logits only at trained positions (fp32), the log-softmax cross-entropy keeps, and
  the logits' gradient.

The model itself is built on `meta` from its config (no weights read), with the run's adapter applied,
so parameter counts are exact. `benchmarks/memory_planner.py` compares the estimate with measured bytes
of real runs (saved tensors, parameters, gradients, optimizer state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.model.linear_cross_entropy import chunk_rows
from tuneforge.train.activation_probe import inner_decoder, layer_activation_bytes, meta_model
from tuneforge.train.deepspeed_config import zero_stage

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per 64 weights
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # absmax in 8 bits, one fp32 per 256 of them


@dataclass
class MemoryPlan:
    """Bytes per device of each part of the peak, for one micro-batch of `micro_batch` rows x `seq_len` tokens."""

    parts: dict[str, float]
    micro_batch: int
    seq_len: int
    per_row_activation_bytes: float  # how the activations grow with the micro-batch
    device: str
    precision: str
    device_bytes: float | None = None
    notes: list[str] = field(default_factory=list)
    checkpointing: bool = False  # train.gradient_checkpointing as resolved for this plan

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def largest_micro_batch(self) -> int | None:
        """The largest micro-batch that fits (same sequence length), or None without a device size."""
        if self.device_bytes is None:
            return None
        fixed = self.total - self.per_row_activation_bytes * self.micro_batch
        return max(0, int((self.device_bytes - fixed) // self.per_row_activation_bytes))

    def table(self) -> str:
        lines = [
            f"memory plan per device ({self.device}, {self.precision}; micro-batch {self.micro_batch} x "
            f"{self.seq_len} tokens)",
            f"  {'part':<34}{'GiB':>10}",
        ]
        for name, b in self.parts.items():
            lines.append(f"  {name:<34}{b / GIB:>10.3f}")
        lines.append(f"  {'total (peak)':<34}{self.total / GIB:>10.3f}")
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"  device memory {self.device_bytes / GIB:.1f} GiB: {verdict}; largest micro-batch that fits: "
                f"{self.largest_micro_batch()}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the model on meta
# ---------------------------------------------------------------------------- the plan
AUTO_CHECKPOINTING_SHARE = 0.5  # auto: checkpointing when the plan without it exceeds this share of free memory


def plan_memory(
    cfg: RunConfig,
    device: str = "cpu",
    precision: str | None = None,
    gpus: int = 1,
    device_bytes: float | None = None,
    trained_fraction: float = 1.0,
) -> MemoryPlan:
    """Estimate peak memory per device of a training step of this config (DDP: every rank holds everything),
    with train.gradient_checkpointing as `choose_checkpointing` resolves it (said in the plan's notes)."""
    from tuneforge.model.load import choose_precision

    precision = precision or choose_precision(cfg.train.precision, device)
    model = meta_model(cfg, device)
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return _plan(
            cfg,
            model,
            device,
            precision,
            gpus,
            device_bytes,
            trained_fraction,
            setting,
            f"gradient checkpointing {'on' if setting else 'off'} (train.gradient_checkpointing={setting})",
        )
    plain = _plan(cfg, model, device, precision, gpus, device_bytes, trained_fraction, False, "")
    checkpointing, why = choose_checkpointing(plain)
    if not checkpointing:
        plain.notes.insert(0, f"gradient checkpointing off (auto: {why})")
        return plain
    return _plan(
        cfg,
        model,
        device,
        precision,
        gpus,
        device_bytes,
        trained_fraction,
        True,
        f"gradient checkpointing on (auto: {why})",
    )


def resolve_auto_checkpointing(cfg: RunConfig, device: str, gpus: int = 1) -> str:
    """Settle train.gradient_checkpointing=auto in `cfg` from the plan against this device's free memory; the line
    to log. (`tuneforge train` settles it before the Trainer, with the same plan; this serves direct Trainer use.)"""
    try:
        plan = plan_memory(cfg, device, gpus=gpus, device_bytes=available_bytes(device))
    except Exception as e:  # noqa: BLE001 - no plan (a config it cannot read): keep the faster setting
        cfg.train.gradient_checkpointing = False
        return f"gradient checkpointing off (auto: no memory plan, {type(e).__name__})"
    cfg.train.gradient_checkpointing = plan.checkpointing
    return plan.notes[0]


def choose_checkpointing(plain: MemoryPlan) -> tuple[bool, str]:
    """train.gradient_checkpointing=auto, from the plan without checkpointing: (on?, why). On when that plan would
    take more than AUTO_CHECKPOINTING_SHARE of the free device memory (RAM on a CPU): room is left for what the
    plan does not count (the allocator's slack, the Python process, other programs) and for its estimate's error,
    so a run that fits without recomputing stays as fast as it can be and one that might not fit is made safe."""
    total = plain.total
    if plain.device_bytes is None:
        return False, f"{total / GIB:.1f} GiB planned, free memory unknown"
    share = total / plain.device_bytes
    if share > AUTO_CHECKPOINTING_SHARE:
        return True, (
            f"{total / GIB:.1f} GiB without it would be {share:.0%} of the {plain.device_bytes / GIB:.1f} GiB "
            f"free, over {AUTO_CHECKPOINTING_SHARE:.0%}"
        )
    return False, f"{total / GIB:.1f} GiB planned, {share:.0%} of the {plain.device_bytes / GIB:.1f} GiB free"


def _plan(
    cfg: RunConfig,
    model,
    device: str,
    precision: str,
    gpus: int,
    device_bytes: float | None,
    trained_fraction: float,
    checkpointing: bool,
    decision: str,
) -> MemoryPlan:
    base, decoder = inner_decoder(model)
    hidden, vocab, layers = base.config.hidden_size, base.get_output_embeddings().weight.shape[0], len(decoder.layers)
    adapter = cfg.adapter.type
    frozen_bytes = DTYPE_BYTES[precision] if adapter != "full" else 4
    quant = NF4_DOUBLE_QUANT_BYTES if cfg.adapter.double_quant else NF4_BYTES

    weights = trainable = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            weights += 4 * p.numel()
        elif adapter == "qlora" and p.ndim == 2 and ".layers." in name:  # a frozen decoder linear in 4 bits
            weights += quant * p.numel()
        else:
            weights += frozen_bytes * p.numel()
    optim_bytes = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}[cfg.train.optimizer]

    rows, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    act_dtype = torch.float32 if precision == "fp32" else torch.bfloat16 if precision == "bf16" else torch.float16
    per_layer = layer_activation_bytes(model, rows, seq, act_dtype)
    layer_input = rows * seq * hidden * DTYPE_BYTES[precision]
    # kept through the forward: every layer's saves (checkpointing: only its input), and the final norm's input;
    # with checkpointing, backward recomputes one layer at a time on top of that
    recompute = per_layer if checkpointing else 0.0
    activations = layers * (layer_input if checkpointing else per_layer) + layer_input
    if adapter == "full":  # the final norm's weight trains: its normalised output is kept for that gradient
        activations += layer_input
    positions = rows * seq * trained_fraction if cfg.train.logits != "full" else rows * seq
    sharded = cfg.dist.strategy == "fsdp2" or (cfg.dist.strategy == "deepspeed" and zero_stage(cfg) == 3)
    if cfg.train.logits == "chunked" and not sharded:  # the head input's gradient, computed with the loss; one
        head_kept = positions * hidden * DTYPE_BYTES[precision]  # chunk's logits at a time
        if adapter == "full":  # and the head weight's gradient (fp32), also computed with the loss
            head_kept += 4 * vocab * hidden
        # a chunk's fp32 logits, and their softmax beside them (on a CPU in fp32: in place, in one kept workspace)
        buffers = 1 if device == "cpu" and precision == "fp32" else 2
        head_transient = buffers * min(positions, chunk_rows(vocab)) * vocab * 4
    else:
        head_kept = positions * hidden * DTYPE_BYTES[precision] + positions * vocab * 4  # head input; fp32 log-softmax
        head_transient = 2 * positions * vocab * 4  # the logits beside their log-softmax, then their gradient
    per_row = (activations + recompute + head_kept + head_transient) / rows

    parts = {
        "weights": weights,
        "gradients": 4 * trainable,
        f"optimizer ({cfg.train.optimizer})": optim_bytes * trainable,
        "activations (decoder)": activations,
        "activations (LM head, loss)": head_kept,
        "logits and their gradient": head_transient,
    }
    if recompute:
        parts["recomputed layer (checkpointing)"] = recompute
    notes = [decision] if decision else []
    if precision != "fp32":
        notes.append("activations estimated in the compute dtype; norms and softmax kept in fp32 add a few percent")
    _shard(parts, cfg, gpus, notes, sum(p.numel() for p in decoder.layers[0].parameters()) * frozen_bytes)
    return MemoryPlan(parts, rows, seq, per_row, device, precision, device_bytes, notes, checkpointing)


def _shard(parts: dict, cfg: RunConfig, gpus: int, notes: list[str], layer_bytes: float) -> None:
    """Divide what dist.strategy shards over `gpus` devices; what is offloaded leaves the device (in place)."""
    strategy, d = cfg.dist.strategy, cfg.dist
    optim = next(k for k in parts if k.startswith("optimizer"))
    if strategy in ("auto", "ddp"):
        if gpus > 1:
            notes.append(f"DDP on {gpus} devices: every device holds the whole model and optimizer (no sharding)")
        return
    if strategy == "fsdp2":
        sharded, what = ["weights", "gradients", optim], "FSDP2"
        offloaded = sharded if d.offload_optimizer else []
        gathered = layer_bytes * (1 if d.fsdp_reshard_after_forward else 2)
    else:
        stage = zero_stage(cfg)
        sharded = [optim] + (["gradients"] if stage >= 2 else []) + (["weights"] if stage == 3 else [])
        what = f"DeepSpeed ZeRO-{stage}"
        offloaded = ([optim] if d.offload_optimizer else []) + (["weights"] if d.offload_params else [])
        gathered = layer_bytes if stage == 3 else 0.0
    for key in sharded:
        parts[key] /= gpus
    for key in offloaded:
        parts[key] = 0.0
    if gathered and gpus > 1:
        parts["gathered layer (all-gather)"] = gathered
    notes.append(
        f"{what} on {gpus} devices: {', '.join(k.split(' ')[0] for k in sharded)} divided over the devices"
        + (f"; {', '.join(k.split(' ')[0] for k in offloaded)} in CPU RAM" if offloaded else "")
    )


def parse_size(text: str) -> float:
    """'80GiB', '24GB', '512MiB' -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"memory size {text!r}: use a number with a unit, e.g. 80GiB, 24GB or 512MiB")
    return float(num) * units[unit]


def available_bytes(device: str) -> float | None:
    """Memory this process can use on the device: free CUDA memory, or available RAM."""
    if device == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return None


def check_fits(plan: MemoryPlan) -> str | None:
    """A warning for `train` when the plan exceeds the device, with what to change; None when it fits."""
    if plan.fits is not False:
        return None
    fits = plan.largest_micro_batch()
    fixes = [
        f"train.micro_batch_size={fits} with train.grad_accum raised to keep the batch" if fits else None,
        "train.gradient_checkpointing=true",
        "adapter.type=qlora",
        "a shorter data.max_seq_len",
    ]
    return (
        f"memory plan: this run needs about {plan.total / GIB:.1f} GiB per device but {plan.device_bytes / GIB:.1f} "
        f"GiB are available; it will probably run out of memory. Try: "
        + "; ".join(f for f in fixes if f)
        + ". (tuneforge plan CONFIG shows the breakdown.)"
    )


def plan_for_run(
    cfg: RunConfig, run_dir: Path | None, device: str, device_bytes: float | None, gpus: int = 1
) -> MemoryPlan:
    """The plan of a run (`tuneforge plan`, and `train` before loading the model), with the LM head sized by the
    share of trained positions the prepared data reports (every position when it is not prepared yet)."""
    fraction = 1.0
    report = (run_dir / "data" / "data_report.json") if run_dir else None
    if report is not None and report.exists() and not cfg.data.packing:
        fraction = json.loads(report.read_text()).get("train", {}).get("trained_fraction", 1.0)
    precision = None
    if device == "cuda" and cfg.train.precision == "auto" and not torch.cuda.is_available():
        precision = "bf16"  # planning for a GPU from a machine without one: assume a bf16-capable GPU
    plan = plan_memory(cfg, device, precision, gpus=gpus, device_bytes=device_bytes, trained_fraction=fraction)
    if fraction == 1.0:
        plan.notes.append("LM head sized for every position trained (prepare the data first for the real fraction)")
    return plan
