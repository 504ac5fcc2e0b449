"""The trained model of a run: base weights (hub, directory, a new tiny model or a GGUF file; 4-bit for QLoRA)
with kernels, the adapter and compilation applied, ready for `train/parallel.py` to wrap.

Called by `Trainer.setup()` once the device, precision and process group are settled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.model.adapters import apply_adapter
from tuneforge.model.gguf_source import is_gguf, link_base
from tuneforge.model.kernels import apply_liger, check_liger
from tuneforge.model.load import DTYPES, choose_attention, load_model, load_quantized, model_source
from tuneforge.train.optim import compile_layers
from tuneforge.train.reward_step import reward_model_for_run, train_the_head


def build_model(
    cfg: RunConfig, run_dir: Path, tokenizer, accelerator, precision: str, device: str, sharded: bool, log: Callable
) -> tuple[torch.nn.Module, str]:
    """Load the base, give it its adapter; returns the model and the attention implementation chosen.
    A base that lives in the run (a new model, a converted GGUF) is written or linked to `run_dir/base`."""
    if cfg.train.liger_kernels:
        check_liger(device)  # before any weight is loaded
    attention = choose_attention(cfg.model.attn_implementation, device)
    frozen_low_precision = cfg.adapter.type != "full" and precision != "fp32"
    dtype = DTYPES[precision] if frozen_low_precision else torch.float32
    qlora, gguf = cfg.adapter.type == "qlora", is_gguf(cfg.model.name_or_path)
    own_base = cfg.model.init is not None or gguf  # a new tiny model or a converted GGUF file: base/ in the run

    def load_4bit(source: str):
        a, m = cfg.adapter, cfg.model
        return load_quantized(
            source,
            DTYPES[precision],
            device,
            a.quant_type,
            a.double_quant,
            attention,
            m.revision,
            m.trust_remote_code,
            vocab_size=len(tokenizer),
        )

    if qlora and not own_base:  # straight from the hub/directory into 4 bits
        model = load_4bit(cfg.model.name_or_path)
    else:
        if gguf:  # converted once, by the main process; the others find it cached (loading stays collective)
            with accelerator.main_process_first():
                model_source(cfg.model, dtype, log)
        # (a GGUF's conversion was reported just above: the lookup inside load_model stays quiet)
        model = load_model(
            cfg.model, tokenizer, dtype, attention, seed=cfg.train.seed, log=(lambda _: None) if gguf else log
        )
    if own_base and cfg.adapter.type != "full":
        # an adapter needs its base on disk, beside the run: the new model saved, or the converted GGUF linked
        base_dir = (run_dir / "base").resolve()
        if accelerator.is_main_process and gguf:
            link_base(Path(model.name_or_path), base_dir)
        elif accelerator.is_main_process:
            model.save_pretrained(str(base_dir))
            tokenizer.save_pretrained(str(base_dir))
        accelerator.wait_for_everyone()
        model.name_or_path = str(base_dir)
    if qlora:
        from peft import prepare_model_for_kbit_training

        if own_base:  # the saved base, reloaded in 4 bits
            source = model.name_or_path
            del model
            model = load_4bit(source)
        # frozen 4-bit linears; norms and embeddings in fp32; input grads on for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.train.liger_kernels:
        log(apply_liger(model, device))
    torch.manual_seed(cfg.train.seed)
    if cfg.objective.type == "reward":  # the backbone with a scalar head instead of the LM head
        model = reward_model_for_run(model, tokenizer.pad_token_id)
    model = apply_adapter(
        model,
        cfg.adapter,
        cfg.train.gradient_checkpointing,
        mask_dropout=device == "cpu",
        addmm=not sharded,
        task_type=None if cfg.objective.type == "reward" else "CAUSAL_LM",
        exclude_modules=["score"] if cfg.objective.type == "reward" else None,  # the head trains in full
    )
    if cfg.objective.type == "reward":
        train_the_head(model)
    if cfg.train.compile:
        compiled = compile_layers(model)
        log(f"torch.compile: {compiled} decoder layer{'s' if compiled != 1 else ''} (compiled on first use)")
    return model, attention
