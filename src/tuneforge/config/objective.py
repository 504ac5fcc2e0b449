"""The `objective:` section: what the run optimises. `sft` (the default) is next-token loss on the trained
tokens; the preference objectives train on pairs (`dpo`, `ipo`, `simpo`, `orpo`), `kto` on unpaired rows
labelled desirable or not, `reward` a Bradley-Terry reward model, `grpo` reinforcement learning with verifiable
rewards on the policy's own rollouts (`objective.grpo`). Each reads only its own parameters."""

from __future__ import annotations

import re
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
    "grpo": ("grpo",),
}
BUILTIN_REWARDS = ("exact_match", "numeric", "format", "length")


class RewardConfig(Section):
    """One reward of a grpo run: a built-in (`type`) or a user function (`function: module:function`)."""

    type: Literal["exact_match", "numeric", "format", "length"] | None = Field(
        None,
        description="exact_match: 1 when the completion (stripped) equals the reference answer; numeric: 1 when the "
        "completion's last number equals the reference's last number (commas, units, trailing punctuation "
        "ignored); format: 1 when `pattern` matches the completion (re.search); length: -max(0, completion tokens - "
        "target_tokens) / max_new_tokens.",
    )
    function: str | None = Field(
        None,
        description="A user reward `module:function` (importable), called as function(prompts, completions, rows) "
        "-> one float per completion; rows[i] is completion i's data row (prompt, reference, completion_tokens).",
    )
    weight: float = Field(1.0, description="The reward's weight in the total reward (sum of weight x reward).")
    pattern: str | None = Field(None, description="format: the regular expression the completion must match.")
    target_tokens: int = Field(0, ge=0, description="length: completion tokens allowed before the penalty starts.")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardConfig:
        if (self.type is None) == (self.function is None):
            raise ValueError("a reward names either type (exact_match, numeric, format, length) or function")
        if self.function is not None and (":" not in self.function or self.function.startswith(":")):
            raise ValueError(f"reward function {self.function!r}: write it as module:function, e.g. myrewards:score")
        if self.type == "format":
            if not self.pattern:
                raise ValueError("a format reward needs pattern: the regular expression a completion must match")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"format reward pattern {self.pattern!r} is not a regular expression: {e}") from e
        elif self.pattern is not None:
            raise ValueError("pattern applies to a format reward only: remove it or set type: format")
        return self

    @property
    def name(self) -> str:
        return self.type if self.type is not None else self.function.split(":", 1)[1]


class GrpoConfig(Section):
    """objective.grpo: rollouts, rewards and the clipped policy-gradient loss. The step's prompts are its rows
    (train.micro_batch_size x train.grad_accum per process)."""

    generations: int = Field(4, ge=2, description="Completions sampled per prompt (G), the group of the baseline.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens sampled per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    updates_per_batch: int = Field(
        1,
        ge=1,
        le=16,
        description="Optimizer updates per rollout batch (TRL's num_iterations, PPO's epochs): 1 is on-policy "
        "(the importance ratio is exactly 1); with more, the later updates clip the ratio to the policy that "
        "sampled the batch. Each step of the run is one rollout batch; the learning-rate schedule and "
        "train.warmup_steps count updates.",
    )
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="Clipping: the ratio's lower bound is 1 - epsilon_low.")
    epsilon_high: float = Field(
        0.2, ge=0, description="Clipping: the ratio's upper bound is 1 + epsilon_high (DAPO: 0.28)."
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the per-token KL to the reference (k3 estimator, as TRL / DeepSeekMath); the "
        "reference is the LoRA adapter switched off. 0: no reference pass.",
    )
    loss_normalization: Literal["sequence", "token", "constant"] = Field(
        "sequence",
        description="sequence (GRPO): each completion's mean token loss, averaged over completions; token (DAPO): "
        "the sum over the step's completion tokens / their count; constant (Dr. GRPO): the sum / (completions x "
        "max_new_tokens).",
    )
    scale_rewards: bool = Field(
        True, description="Divide each advantage by its group's reward std (+1e-4), as GRPO; false: Dr. GRPO."
    )
    skip_zero_advantage: bool = Field(
        True,
        description="With kl_coef 0, completions whose advantage is 0 (every completion of a group whose rewards "
        "are all equal) give exactly no gradient: they are left out of the update (counted in the loss "
        "normalisation and the reward metrics all the same); a micro-batch left with none runs no forward. The "
        "same update at less compute (early in training on a hard task, most groups); false: every completion "
        "runs through the update.",
    )
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="The rewards (at least one), summed with their weights; each is logged."
    )
    eval_prompts: int = Field(
        64, ge=1, description="Held-out prompts scored (greedy) before and after training, at most."
    )

    @model_validator(mode="after")
    def _some_reward(self) -> GrpoConfig:
        if not self.rewards:
            raise ValueError(
                "objective.grpo.rewards is empty: name at least one, e.g. rewards: [{type: numeric}] (see "
                "docs/alignment.md)"
            )
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"objective.grpo.rewards: each reward once ({', '.join(names)})")
        return self


class ObjectiveConfig(Section):
    type: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "reward", "grpo"] = Field(
        "sft",
        description="sft: next-token loss on the trained tokens. dpo / ipo / simpo / orpo: preference pairs "
        "(prompt, chosen, rejected); kto: rows labelled desirable or undesirable; reward: a Bradley-Terry reward "
        "model (a scalar head) on pairs. dpo, ipo and kto compare with a reference, the starting weights: a "
        "LoRA/DoRA run switches its adapter off; a full fine-tune (dpo, ipo) computes the reference's log-probs "
        "once before training and caches them with the prepared data (<run>/data/reference/). grpo: reinforcement "
        "learning on rows whose output is the reference answer, with rewards (objective.grpo).",
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

    grpo: GrpoConfig | None = Field(None, description="grpo: rollouts, rewards and loss (see GrpoConfig).")

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
        if self.type == "grpo" and self.grpo is None:
            raise ValueError(
                "objective.type grpo needs objective.grpo with at least its rewards, e.g. grpo: {rewards: [{type: "
                "numeric}]} (see docs/alignment.md)"
            )
        return self

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.type == "simpo" else 0.1)
