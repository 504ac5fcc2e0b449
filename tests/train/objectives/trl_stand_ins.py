"""Run TRL's own loss code (trl 1.16) on given per-token log-probs / logits / rewards, without a Trainer.

TRL's losses are methods of its trainers. Each helper here calls the method itself with a minimal stand-in for
`self` (the attributes it reads: beta, loss types, a pass-through accelerator, metric buffers) and a stand-in
model that returns the given tensors as its output, so the numbers are TRL's code, not a copy of its formulas.
"""

from __future__ import annotations

import os
import types
import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOTrainer, KTOTrainer, RewardTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer


class PassThroughAccelerator:
    """One process: gathering returns what it is given."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, model):
        return model


def _stand_in(**attributes) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=PassThroughAccelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def _fused_output(log_probs: torch.Tensor) -> SimpleNamespace:
    """What TRL's fused LM head returns: per-token log-probs (0 where the label is -100) and metric fields."""
    zeros = torch.zeros_like(log_probs.detach())
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    model=None,
    inputs: dict | None = None,
):
    """DPOTrainer._compute_loss on rows [chosen..., rejected...]: per_token_logps (2B, L-1), already zero outside
    the completion; completion_mask (2B, L). Or, with `model` (one with TRL's fused LM head) and its `inputs`
    (input_ids, attention_mask, completion_mask), TRL's whole policy pass. Returns (loss, TRL's logged metrics)."""
    self = _stand_in(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    if inputs is None:
        inputs = {
            "input_ids": torch.zeros_like(completion_mask),
            "attention_mask": torch.ones_like(completion_mask),
            "completion_mask": completion_mask,
        }
    inputs = {**inputs, "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    if model is None:
        model = lambda **kw: _fused_output(per_token_logps)  # noqa: E731
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def trl_cpo_loss(chosen_avg_logps, rejected_avg_logps, loss_type: str, beta: float, simpo_gamma: float, eps: float):
    """CPOTrainer.cpo_loss (no AlphaPO): (losses, chosen_rewards, rejected_rewards)."""
    self = _stand_in(alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=eps)
    return CPOTrainer.cpo_loss(self, chosen_avg_logps, rejected_avg_logps)


def trl_batch_logps(logits, labels, average: bool):
    """CPOTrainer.get_batch_logps: per-sequence sum (or per-token average) of the labels' log-probs."""
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)


def trl_orpo(logits: torch.Tensor | None, batch: dict[str, torch.Tensor], beta: float, model=None):
    """ORPOTrainer.get_batch_loss_metrics: the whole ORPO loss (chosen NLL - mean odds-ratio term) from a model
    whose output is `logits` for the concatenated [chosen; rejected] rows, or from `model` itself.
    Returns (loss, metrics)."""
    self = _stand_in(is_encoder_decoder=False, padding_value=0, beta=beta)
    self.concatenated_inputs = ORPOTrainer.concatenated_inputs
    self.get_batch_logps = ORPOTrainer.get_batch_logps
    self.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, self)
    self.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, self)
    if model is None:
        model = lambda *args, **kw: SimpleNamespace(logits=logits)  # noqa: E731
    return ORPOTrainer.get_batch_loss_metrics(self, model, batch)


def trl_kto(
    per_token_logps,
    kl_per_token_logps,
    labels,
    ref_logps,
    ref_kl_logps,
    beta,
    desirable_weight,
    undesirable_weight,
    model=None,
    inputs: dict | None = None,
):
    """KTOTrainer._compute_loss with precomputed reference log-probs, the KL term from the mismatched completions
    (calculate_KL). per_token_logps / kl_per_token_logps: (B, L-1), zero outside the completions. Or, with `model`
    (one with TRL's fused LM head) and its `inputs` (input_ids, attention_mask, completion_mask and the KL_ ones),
    TRL's whole policy pass."""
    n, width = len(labels), (per_token_logps.shape[1] + 1 if per_token_logps is not None else 2)
    self = _stand_in(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, self)
    ids, kl_ids = torch.zeros(n, width, dtype=torch.long), torch.ones(n, width, dtype=torch.long)
    mask = torch.ones(n, width, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": mask,
        "KL_completion_mask": mask,
        "label": torch.as_tensor(labels, dtype=torch.bool),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }

    if inputs is not None:
        batch.update(inputs)
    if model is None:

        def model(**kw):
            return _fused_output(kl_per_token_logps if kw["input_ids"] is kl_ids else per_token_logps)

    loss = KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def trl_reward(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=None):
    """RewardTrainer.compute_loss on a model whose output logits are the rewards [chosen; rejected]."""
    self = _stand_in(args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    logits = torch.cat([chosen_rewards, rejected_rewards])[:, None]
    inputs = {"attention_mask": torch.ones(logits.shape[0], 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(self, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}
