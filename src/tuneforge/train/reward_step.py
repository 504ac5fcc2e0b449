"""A Bradley-Terry reward model on the loop (objective.type: reward), on preference pairs.

The model: the run's causal LM becomes a transformers `*ForSequenceClassification` with one label that shares its
backbone (`objectives/reward.reward_model_from_causal_lm`: the LM head is dropped, a scalar head `score` is new).
With LoRA / DoRA the adapter goes on the backbone and the head trains fully (it is among the trainable parameters,
so checkpoints hold it and a resumed run restores it exactly); with full fine-tuning everything trains.

The batch: a pair's two sequences (prompt + chosen, prompt + rejected) in one padding-free pass, as for DPO
(`objective_step.PairBatches`); each sequence's reward is the head's output at its last token (the end-of-turn
marker of the completion), `objectives/reward.sequence_rewards`; the loss -log sigma(r_c - r_r - margin) per pair.

`final/` of a reward run is the complete sequence-classification model, LoRA merged into the body and the head
kept (`final_reward_model`), with the tokenizer, so that
`transformers.AutoModelForSequenceClassification.from_pretrained("<run>/final")` gives the same rewards. It is not
a causal LM: `tuneforge generate`, `serve` and `export` refuse it (there is nothing left to merge or export).
"""

from __future__ import annotations

import copy

from tuneforge.config.schema import RunConfig
from tuneforge.train.objectives.reward import reward_head, reward_model_from_causal_lm


def reward_model_for_run(causal_lm, pad_token_id: int | None):
    """The reward model built on the run's causal LM (before its adapter), keeping where the base came from."""
    reward = reward_model_from_causal_lm(causal_lm, pad_token_id)
    reward.name_or_path = causal_lm.name_or_path
    return reward


def train_the_head(model) -> None:
    """After the adapter froze everything else: the scalar head trains fully."""
    reward_head(model).requires_grad_(True)


def final_reward_model(model):
    """What `final/` holds for a reward run: the sequence-classification model itself (full fine-tuning), or a
    copy of it with the LoRA / DoRA adapter merged into the body (the trained model is left as it is)."""
    inner = model
    while not hasattr(inner, "merge_and_unload") and not hasattr(inner, "score") and hasattr(inner, "module"):
        inner = inner.module
    if not hasattr(inner, "merge_and_unload"):
        return inner
    merged = copy.deepcopy(inner).merge_and_unload(safe_merge=True)
    merged.config.use_cache = True
    return merged


def reward_setup_error(cfg: RunConfig) -> str | None:
    """Why this run's setup cannot train a reward model yet (None: it can)."""
    if cfg.adapter.type == "qlora":
        return (
            "objective.type=reward merges its adapter into the body for final/, which a 4-bit base cannot hold "
            "exactly: use adapter.type=lora (or dora, full)"
        )
    if cfg.dist.strategy in ("fsdp2", "deepspeed"):
        return (
            f"objective.type=reward with dist.strategy={cfg.dist.strategy}: final/ is written from the whole model "
            "on one process, not from sharded weights, yet; use dist.strategy=ddp (or auto)"
        )
    return None
