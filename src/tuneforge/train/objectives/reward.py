"""Bradley-Terry reward model: a scalar head on the causal LM's backbone, trained on preference pairs.

    loss = -log sigma(r(x, y_c) - r(x, y_r) - m) + c (r(x, y_c) + r(x, y_r))^2

m: a margin the chosen reward must exceed the rejected by (per pair or one number), c: TRL's optional
center_rewards_coefficient (0 by default). r is the head's output at the sequence's last token.
The reward model is a transformers `*ForSequenceClassification` with num_labels=1 that shares the causal LM's
backbone (`reward_model_from_causal_lm`), so `save_pretrained` writes a directory that
`transformers.AutoModelForSequenceClassification.from_pretrained` loads as it is.
The loss is TRL 1.16's (trl/trainer/reward_trainer.py `compute_loss`); tests/train/objectives/test_reward.py
compares with it.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tuneforge.model.attention import rows_by_position, sequence_starts


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss per pair: -log sigma(r_c - r_r - margin) + c (r_c + r_r)^2 (see the module docstring).
    Metrics per pair (detached): rewards/chosen, rewards/rejected, rewards/margins (r_c - r_r), rewards/accuracies
    (pairwise accuracy, r_c > r_r), and logps/chosen, logps/rejected as the rewards themselves (a reward model
    has no log-probabilities; the keys are there so every objective logs the same)."""
    difference = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(difference - margin if margin is not None else difference)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
    return losses, metrics


def reward_model_from_causal_lm(causal_lm, pad_token_id: int | None = None):
    """A `*ForSequenceClassification` model with one label whose backbone IS the causal LM's (shared, not copied)
    and a new scalar head `score` (normal, std config.initializer_range, in the backbone's dtype and device).

    pad_token_id: written to the config (default: the causal LM's, else its eos), since transformers' pooling of a
    padded batch needs one; it takes the rightmost token that is not padding."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.architectures = None
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        eos = config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    config.pad_token_id = pad_token_id
    with torch.device("meta"):  # no second backbone: its weights are the causal LM's
        reward = AutoModelForSequenceClassification.from_config(config)
    prefix = reward.base_model_prefix
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    setattr(reward, prefix, backbone)
    if not isinstance(getattr(reward, "score", None), torch.nn.Linear):
        raise TypeError(f"{type(reward).__name__} has no linear `score` head; tuneforge cannot build its reward model")
    weight = next(backbone.parameters())
    score = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=weight.dtype, device=weight.device)
    torch.nn.init.normal_(score.weight, std=getattr(config, "initializer_range", 0.02))
    reward.score = score
    return reward


def reward_head(model) -> torch.nn.Module:
    """The `score` head of a (peft-, DDP- or compile-wrapped) reward model."""
    inner = model
    while not hasattr(inner, "score") and hasattr(inner, "module"):
        inner = inner.module
    if not hasattr(inner, "score") and hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not hasattr(inner, "score"):
        raise TypeError(f"{type(model).__name__} has no `score` head; is it a sequence-classification model?")
    return inner.score


def sequence_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """r per sequence: the reward head's output at each sequence's last token. Sequences as in
    `model.lm_loss.sequence_logps`: the rows of a padded batch (the last position the attention_mask keeps), or, in
    a batch whose samples position_ids delimit (padding-free), each run of positions from a 0 to the next.
    The model runs through its own wrappers (DDP, peft); the head's output is read by a hook."""
    seen: list[torch.Tensor] = []
    handle = reward_head(model).register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        if "position_ids" in batch:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
            context = rows_by_position()
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            context = contextlib.nullcontext()
        with context:
            model(**inputs)
    finally:
        handle.remove()
    scores = seen[0][..., 0]  # (rows, length)
    if "position_ids" in batch:
        starts = sequence_starts(batch["position_ids"])
        ends = torch.zeros_like(starts)
        ends[:, :-1] = starts[:, 1:]
        ends[:, -1] = True  # a sequence ends where the next starts, or at the row's end
        return scores[ends.to(scores.device)]
    last = batch["attention_mask"].cumsum(-1).argmax(-1)  # the last kept position (right or left padding)
    return scores[torch.arange(scores.shape[0], device=scores.device), last.to(scores.device)]
