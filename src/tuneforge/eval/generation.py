"""Batched greedy/sampled generation from chat messages, with the tokenizer's own chat template, on the infer
engine (KV-cached continuous batching, run synchronously in the calling thread)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from tuneforge.data.masks import prompt_ids
from tuneforge.infer.engine import Engine, SamplingParams


def context_length(model, tokenizer: PreTrainedTokenizerBase) -> int:
    """Positions the model can attend to: its config's max_position_embeddings, else the tokenizer's limit."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048))


def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    stop_ids: list[int] | None = None,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Continue each conversation with an assistant turn; returns the generated texts (stop token and specials
    removed, stripped). At most `batch_size` rows decode at once, a finished row's slot going to the next
    conversation; generation ends at a stop id, `max_new_tokens` or the model's context. Sampling (temperature
    > 0) is seeded, so a call is reproducible. `on_batch(n)` is called whenever n more conversations are done
    (progress display). The model is put in eval mode and back in training mode afterwards if it was training.

    Every rank of a sharded model (FSDP2, ZeRO-3) may call this with the same conversations: the engine makes
    the same forward calls on each (see `Engine.run_to_completion`)."""
    stops = [int(t) for t in (stop_ids or [tokenizer.eos_token_id]) if t is not None]
    prompts = [prompt_ids(tokenizer, tokenizer.chat_template, c) for c in conversations]
    engine = Engine(model, tokenizer, stops, context_length(model, tokenizer), max_batch_size=batch_size)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    was_training = model.training
    model.eval()
    try:
        outs = engine.run_to_completion(prompts, params, on_finished=on_batch)
    finally:
        if was_training:
            model.train()
    return [tokenizer.decode(_without_stop(ids, stops), skip_special_tokens=True).strip() for ids in outs]


def _without_stop(ids: list[int], stops: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stops else ids
