"""KTO (Ethayarajh et al. 2024): unpaired rows, each a completion labelled desirable or undesirable.

With r = log pi(y|x) - log ref(y|x) (sums over the completion tokens) and z the KL estimate,

    desirable:    loss = w_d (1 - sigma(beta (r - z)))
    undesirable:  loss = w_u (1 - sigma(beta (z - r)))

z = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)), detached, where y' is a completion of ANOTHER row
(mismatched: row i's prompt with row i-1's completion, cyclically, `mismatched_completion_index`). The caller may
pass z itself (e.g. the mean gathered over all processes, as TRL does) or no KL at all (z = 0).
The formulas are TRL 1.16's (trl/trainer/kto_trainer.py `_compute_loss`, loss_type="kto");
tests/train/objectives/test_kto.py compares with it.
"""

from __future__ import annotations

import torch


def mismatched_completion_index(n_rows: int) -> list[int]:
    """For each row, the row whose completion goes with its prompt in the KL estimate: the previous one, cyclically
    (TRL: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1])."""
    return [(i - 1) % n_rows for i in range(n_rows)]


def kto_kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """mean(log pi(y'|x) - log ref(y'|x)) over the mismatched pairs, detached and unclamped (average it over the
    processes before clamping, as `kto_loss` does)."""
    return (policy_kl_logps - reference_kl_logps).mean().detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | float | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss per row, in the rows' order (the batch loss is their mean, as TRL's `losses.nanmean()`).

    desirable: bool per row. kl: the KL estimate z (clamped at 0, detached); without it, estimated from
    policy_kl_logps / reference_kl_logps (the mismatched completions) when given, else 0.
    Metrics (detached): rewards/chosen and logps/chosen over the desirable rows, rewards/rejected and
    logps/rejected over the undesirable ones (rewards: beta r), rewards/margins = mean chosen reward - mean
    rejected reward (nan without both kinds), rewards/accuracies per row: 1 where the reward's sign agrees with
    the label (tuneforge's; TRL logs none for KTO), and kl."""
    desirable = torch.as_tensor(desirable, dtype=torch.bool, device=policy_logps.device)
    if kl is None:
        if policy_kl_logps is not None and reference_kl_logps is not None:
            kl = kto_kl_estimate(policy_kl_logps, reference_kl_logps)
        else:
            kl = 0.0
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    rewards = beta * logratios.detach()
    chosen_rewards, rejected_rewards = rewards[desirable], rewards[~desirable]
    margin = chosen_rewards.mean() - rejected_rewards.mean() if len(chosen_rewards) and len(rejected_rewards) else None
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": margin if margin is not None else rewards.new_tensor(float("nan")),
        "rewards/accuracies": torch.where(desirable, rewards > 0, rewards < 0).to(rewards.dtype),
        "logps/chosen": policy_logps.detach()[desirable],
        "logps/rejected": policy_logps.detach()[~desirable],
        "kl": kl,
    }
    return losses, metrics
