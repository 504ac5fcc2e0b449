"""Pairwise preference losses on per-sequence log-probabilities: DPO, IPO, SimPO, ORPO.

Inputs are, for each pair, the sums of the completion tokens' log-probabilities under the policy (and, for DPO and
IPO, under the reference model), as `model.lm_loss.sequence_logps` gives them, and the completions' token counts.
Each function returns (loss per pair, metrics): the loss of a batch is the mean of the per-pair losses (what TRL
optimises); the metrics are per-pair, detached tensors (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies as 0/1, logps/chosen, logps/rejected), for the caller to average over whatever it logs.

The formulas are TRL 1.16's (trl/trainer/dpo_trainer.py `_compute_loss`, trl/experimental/cpo/cpo_trainer.py
`cpo_loss`, trl/experimental/orpo/orpo_trainer.py `odds_ratio_loss`); tests/train/objectives compare with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The per-pair metrics every preference objective logs (detached)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigma(x) - eps log sigma(-x): the logistic loss, conservative when eps > 0 (cDPO: eps is the
    assumed share of flipped labels)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO, sigmoid form, with cDPO label smoothing eps:

        h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))      (sums over the completion tokens)
        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    rewards: beta (log pi(y) - log ref(y)). At policy == reference every pair costs ln 2. (TRL 1.16 DPOTrainer
    loss_type="sigmoid" for eps = 0; with eps > 0 this is the cDPO form of TRL's earlier `dpo_loss` and of its
    `aot` loss on one pair.)"""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    metrics = pair_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return losses, metrics


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al. 2023, eq. 17, beta = tau), on log-ratios averaged per completion token as TRL does:

        h = (log pi(y_c) - log ref(y_c)) / |y_c| - (log pi(y_r) - log ref(y_r)) / |y_r|
        loss = (h - 1 / (2 beta))^2

    (|y| clamped to at least 1.) rewards: beta times the summed log-ratios, as TRL logs them."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    metrics = pair_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return losses, metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024): reference-free, on length-normalised log-probs, with a target reward margin gamma:

        x = beta (log pi(y_c) / |y_c| - log pi(y_r) / |y_r|) - gamma
        loss = -(1 - eps) log sigma(x) - eps log sigma(-x)

    TRL CPOTrainer loss_type="simpo" (simpo_gamma = gamma, the margin in reward units) with cpo_alpha = 0.
    rewards: beta log pi(y) / |y|; the logps metrics are the per-token averages (as TRL logs them)."""
    chosen = policy_chosen_logps / chosen_tokens.clamp(min=1)
    rejected = policy_rejected_logps / rejected_tokens.clamp(min=1)
    losses = sigmoid_loss(beta * ((chosen - rejected) - gamma / beta), label_smoothing)
    return losses, pair_metrics(beta * chosen, beta * rejected, chosen, rejected)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (log1p(-exp x) below -ln 2, log(-expm1 x) above)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    orpo_lambda: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
    mean_nll_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024): the chosen completion's NLL plus lambda times the odds-ratio term, reference-free.
    With p = exp(log pi(y) / |y|) (per-token average probability):

        log_odds = (log p_c - log p_r) - (log(1 - p_c) - log(1 - p_r))
        loss_i = NLL_i / mean_nll_tokens - lambda log sigma(log_odds_i)

    chosen_nll: the summed NLL of each pair's chosen sequence (default -policy_chosen_logps: the completion tokens,
    as the paper; TRL's ORPOTrainer also counts the prompt tokens, pass their sum here to match it).
    mean_nll_tokens: tokens per pair that NLL covers, on average (default: over this batch), so that the mean of
    the per-pair losses holds the token mean of the NLL, sum_i NLL_i / sum_i tokens_i, as TRL's cross-entropy;
    a loop that accumulates micro-batches passes the value of the whole step. (TRL `odds_ratio_loss` with beta =
    lambda, which computes in fp32.) rewards: lambda log p; logps metrics: per-token averages; also
    `log_odds_ratio` (log sigma(log_odds)), `log_odds_chosen` (log_odds) and `nll_loss` per pair."""
    chosen = policy_chosen_logps / chosen_tokens.clamp(min=1)
    rejected = policy_rejected_logps / rejected_tokens.clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    if chosen_nll is None:
        chosen_nll = -policy_chosen_logps
    if mean_nll_tokens is None:
        mean_nll_tokens = chosen_tokens.to(chosen_nll.dtype).mean()
    nll = chosen_nll / mean_nll_tokens
    losses = nll - orpo_lambda * ratio
    metrics = pair_metrics(orpo_lambda * chosen, orpo_lambda * rejected, chosen, rejected)
    metrics.update({"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach(), "nll_loss": nll.detach()})
    return losses, metrics
