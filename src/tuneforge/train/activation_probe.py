"""The run's model on the `meta` device (shapes only: exact parameter counts, no memory) and what one of its
decoder layers saves for backward, measured with `saved_tensors_hooks`: the measurements `train/planner.py` builds
its memory plan from."""

from __future__ import annotations

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.train.deepspeed_config import zero_stage


def _model_config(cfg: RunConfig):

    if cfg.model.init is not None:
        from tuneforge.model.load import tiny_config

        init = cfg.model.init

        class _Vocab:  # tiny_config reads these from a tokenizer; the trained tokenizer's size is configured
            bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

            def __len__(self):
                return init.tokenizer_vocab_size

        return tiny_config(init, _Vocab())
    from tuneforge.model.load import ModelLoadError, pretrained_config

    try:
        return pretrained_config(cfg.model)
    except OSError as e:
        raise ModelLoadError(
            f"memory plan: could not read the config of model {cfg.model.name_or_path!r} ({str(e).splitlines()[0]}). "
            "The plan needs only its config.json: download the model (`hf download "
            f"{cfg.model.name_or_path} --local-dir DIR`) and set model.name_or_path to that directory"
        ) from None


def meta_model(cfg: RunConfig, device: str = "cpu"):
    """The run's model and adapter with shapes only (device `meta`): exact parameter counts, no memory. The adapter's
    modules are the ones the run uses on `device` (on a CPU: the LoRA dropout that keeps one byte per element)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.model.adapters import apply_adapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            _model_config(cfg), attn_implementation="sdpa", trust_remote_code=cfg.model.trust_remote_code
        )
        sharded = cfg.dist.strategy == "fsdp2" or (cfg.dist.strategy == "deepspeed" and zero_stage(cfg) == 3)
        model = apply_adapter(
            model, cfg.adapter, gradient_checkpointing=False, mask_dropout=device == "cpu", addmm=not sharded
        )
    return model


def inner_decoder(model):
    """The decoder (model.model of a causal LM) under peft wrappers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.model


class _FusedAttentionSaves(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient, CPU or CUDA) keeps for backward: q, k, v, the output
    and one fp32 log-sum-exp per query. On `meta` SDPA falls back to the math path, which would instead count
    the (rows, heads, seq, seq) attention probabilities that the real kernels never store."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts what forward saves
        raise NotImplementedError


def _fused_sdpa(q, k, v, *args, **kwargs):
    return _FusedAttentionSaves.apply(q, k, v)


def _run_layer(layer, decoder, h, pos, dtype, pack) -> None:
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kwargs = {"attention_mask": None, "position_ids": pos}
        if hasattr(decoder, "rotary_emb"):
            kwargs["position_embeddings"] = decoder.rotary_emb(h, pos)
        layer(h.to(dtype), **kwargs)


def layer_activation_bytes(model, rows: int, seq_len: int, dtype: torch.dtype) -> float:
    """Bytes one decoder layer saves for backward in training mode, measured on meta with saved_tensors_hooks."""
    base, decoder = inner_decoder(model)
    layer = decoder.layers[0]
    hidden = base.config.hidden_size
    h = torch.zeros(rows, seq_len, hidden, device="meta", dtype=dtype, requires_grad=True)
    pos = torch.arange(seq_len, device="meta")[None].expand(rows, seq_len)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    layer.train()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        _run_layer(layer, decoder, h, pos, dtype, pack)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    seen, total = set(), 0
    for t in saved:
        b = t._base if t._base is not None else t
        if id(b) in seen or b.device.type != "meta":  # parameters saved for backward are counted as weights
            continue
        if isinstance(b, torch.nn.Parameter):
            continue
        seen.add(id(b))
        total += b.numel() * b.element_size()
    return float(total)
