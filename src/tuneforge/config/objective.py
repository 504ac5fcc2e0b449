"""The `objective:` section: what the run optimises. `sft` (the default) is next-token loss on the trained
tokens; the preference objectives train on pairs (`dpo`, `ipo`, `simpo`, `orpo`), `kto` on unpaired rows
labelled desirable or not, `reward` a Bradley-Terry reward model. Each reads only its own parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.config.section import Section

# the objectives that compare the policy with a reference model (for LoRA: the same weights, adapter off)
NEEDS_REFERENCE = ("dpo", "ipo", "kto")
PAIRED = ("dpo", "ipo", "simpo", "orpo", "reward")
# parameter -> the objectives that read it
PARAMETERS = {
    "beta": ("dpo", "ipo", "simpo", "kto"),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "orpo_lambda": ("orpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "reward_margin": ("reward",),
}


class ObjectiveConfig(Section):
    type: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "reward"] = Field(
        "sft",
        description="sft: next-token loss on the trained tokens. dpo / ipo / simpo / orpo: preference pairs "
        "(prompt, chosen, rejected); kto: rows labelled desirable or undesirable; reward: a Bradley-Terry reward "
        "model (a scalar head) on pairs. dpo, ipo and kto compare with a reference, the starting weights: a "
        "LoRA/DoRA run switches its adapter off; a full fine-tune (dpo, ipo) computes the reference's log-probs "
        "once before training and caches them with the prepared data (<run>/data/reference/).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the preference (dpo, ipo, kto: against the reference; simpo: reward scale). "
        "Default 0.1 (simpo: 2.0).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo / simpo: assumed share of flipped labels (conservative DPO)."
    )
    simpo_gamma: float = Field(
        0.5,
        ge=0,
        description="simpo: target reward margin, in reward units: the loss is "
        "-log sigma(beta (logp_c/n_c - logp_r/n_r) - gamma), as TRL's simpo_gamma.",
    )
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term beside the chosen NLL.")
    kto_desirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto: weight of desirable rows' losses (with unbalanced data, KTO's paper suggests "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3]).",
    )
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows' losses.")
    reward_margin: float = Field(
        0.0,
        ge=0,
        description="reward: margin the chosen reward must exceed the rejected by (the loss is "
        "-log sigma(r_c - r_r - margin)). A reward run's final/ is a sequence-classification model (LoRA merged, "
        "the scalar head kept) for transformers.AutoModelForSequenceClassification.",
    )

    @model_validator(mode="after")
    def _only_own_parameters(self) -> ObjectiveConfig:
        defaults = ObjectiveConfig.model_construct()
        for name, users in PARAMETERS.items():
            if (
                name in self.model_fields_set
                and self.type not in users
                and getattr(self, name) != getattr(defaults, name, None)
            ):
                raise ValueError(
                    f"objective.{name} applies to objective.type {' / '.join(users)}, not {self.type}: remove it "
                    f"or set objective.type"
                )
        return self

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.type == "simpo" else 0.1)
