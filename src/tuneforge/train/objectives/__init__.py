"""Training objectives: each a loss over per-sequence log-probabilities (or rewards), looked up by name in
OBJECTIVES. The loop computes the sequence log-probs (`model.lm_loss.sequence_logps`, the reference's under
no_grad, or cached) and calls `loss`; it knows nothing else of the objective.

    dpo     preference.dpo_loss     pairs, reference   beta, label_smoothing
    ipo     preference.ipo_loss     pairs, reference   beta                    (token counts)
    simpo   preference.simpo_loss   pairs              beta, gamma, label_smoothing (token counts)
    orpo    preference.orpo_loss    pairs              orpo_lambda             (token counts)
    kto     kto.kto_loss            unpaired rows, reference, KL estimate   beta, desirable/undesirable weights
    reward  reward.reward_loss      pairs, a scalar head (reward.reward_model_from_causal_lm)   margin
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.train.objectives.kto import kto_loss
from tuneforge.train.objectives.preference import dpo_loss, ipo_loss, orpo_loss, simpo_loss
from tuneforge.train.objectives.reward import reward_loss


@dataclass(frozen=True)
class Objective:
    """name: as in objective.type. loss: the function (arguments as its docstring says). needs_reference: it
    compares the policy with a reference model's log-probs. paired: its batch holds chosen/rejected pairs (else
    unpaired labelled rows, KTO). needs_token_counts: its loss reads the completions' token counts. scores: what
    the model gives per sequence, "logps" (`sequence_logps`) or "rewards" (`reward.sequence_rewards`).
    parameters: the `objective:` config key -> the loss function's argument it sets."""

    name: str
    loss: Callable
    needs_reference: bool
    paired: bool
    needs_token_counts: bool
    scores: str = "logps"
    parameters: dict[str, str] = field(default_factory=dict)

    def loss_arguments(self, section) -> dict:
        """The loss function's keyword arguments from an `objective:` config section (any object with those
        attributes); a key set to None keeps the function's default."""
        values = {arg: getattr(section, key, None) for key, arg in self.parameters.items()}
        return {arg: value for arg, value in values.items() if value is not None}


_DPO = {"beta": "beta", "label_smoothing": "label_smoothing"}
_KTO = {"beta": "beta", "kto_desirable_weight": "desirable_weight", "kto_undesirable_weight": "undesirable_weight"}
OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("dpo", dpo_loss, needs_reference=True, paired=True, needs_token_counts=False, parameters=_DPO),
        Objective(
            "ipo", ipo_loss, needs_reference=True, paired=True, needs_token_counts=True, parameters={"beta": "beta"}
        ),
        Objective(
            "simpo",
            simpo_loss,
            needs_reference=False,
            paired=True,
            needs_token_counts=True,
            parameters={**_DPO, "simpo_gamma": "gamma"},
        ),
        Objective(
            "orpo",
            orpo_loss,
            needs_reference=False,
            paired=True,
            needs_token_counts=True,
            parameters={"orpo_lambda": "orpo_lambda"},
        ),
        Objective("kto", kto_loss, needs_reference=True, paired=False, needs_token_counts=False, parameters=_KTO),
        Objective(
            "reward",
            reward_loss,
            needs_reference=False,
            paired=True,
            needs_token_counts=False,
            scores="rewards",
            parameters={"reward_margin": "margin"},
        ),
    )
}

__all__ = ["OBJECTIVES", "Objective", "dpo_loss", "ipo_loss", "kto_loss", "orpo_loss", "reward_loss", "simpo_loss"]
