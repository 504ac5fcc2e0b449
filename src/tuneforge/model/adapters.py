"""LoRA / DoRA (through peft) or full fine-tuning: wrap/freeze the model and report what trains."""

from __future__ import annotations

from transformers import PreTrainedModel

from tuneforge.config.schema import AdapterConfig
from tuneforge.model.dropout import use_mask_dropout


def apply_adapter(
    model: PreTrainedModel,
    cfg: AdapterConfig,
    gradient_checkpointing: bool = False,
    mask_dropout: bool = False,
    addmm: bool = False,
    task_type: str | None = "CAUSAL_LM",
    exclude_modules: list[str] | None = None,
):
    """Return the model ready to train: a peft model for lora/dora, or the model itself for full.
    mask_dropout: LoRA dropout masks from 16 random bits per element instead of bernoulli_ (model/dropout.py,
    for CPUs); addmm: plain LoRA products added inside the GEMM (model/addmm_lora.py), SwiGLU MLPs keeping two
    of their four activations (model/swiglu_lora.py) and RMSNorms keeping their output, not their input
    (model/rms_norm.py); not on sharded models.
    task_type: peft's; None for a model that is not a causal LM (a reward model: a plain PeftModel).
    exclude_modules: modules LoRA leaves alone even under 'all-linear' (a reward model's `score` head)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.type == "dora",
        modules_to_save=cfg.modules_to_save,
        exclude_modules=exclude_modules,
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora)
    if mask_dropout:
        use_mask_dropout(model)
    if addmm:
        from tuneforge.model.addmm_lora import use_addmm_lora
        from tuneforge.model.rms_norm import use_rms_norm_keeping_output
        from tuneforge.model.swiglu_lora import use_swiglu_mlp

        use_addmm_lora(model)
        use_swiglu_mlp(model)
        use_rms_norm_keeping_output(model)
    return model


def trainable_report(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def describe(report: dict) -> str:
    return (
        f"trainable parameters: {report['trainable_params']:,} of {report['total_params']:,} "
        f"({report['trainable_pct']:.2f}%)"
    )
