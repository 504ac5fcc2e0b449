"""How the one loop runs each objective (objective.type): the batch it builds from prepared rows, what the step's
loss is normalised by, and the loss summed over those units. The loop (loop.py) calls only these, for every
objective but sft: `units(batch)`, `begin_step(model, batches, autocast, reduce_sum)` (what the step's losses
share, before any of them), `loss_sum(model, batch, autocast)` per micro-batch, `step_metrics(sums, units)`,
`final_model(model)` (what final/ holds), `prepare_run(...)` once before training, and for the held-out rows
`evaluate`; `build_objective` gives the objective and its collator.

  sft                     rows of input_ids + labels; units: trained tokens; loss: their summed NLL
  dpo, ipo, simpo, orpo   rows of prompt_ids + chosen_ids + rejected_ids: each pair becomes two sequences in the
                          same padding-free pass (prompt + chosen, prompt + rejected; only the completions are
                          trained; with per-sample attention the prompt runs once per pair: pair_batches.py);
                          units: pairs; loss: the objective's per-pair loss (train/objectives/) on the sequences'
                          summed log-probs, computed only at the completion positions (sequence_logps).
                          dpo and ipo compare with the reference: the same weights with the LoRA adapter off,
                          or (full fine-tuning) log-probs cached before training (train/reference_cache.py)
  kto                     rows of prompt_ids + completion_ids + label (train/kto_step.py); units: rows; the KL
                          estimate of the whole step in `begin_step`
  reward                  pairs as dpo's; the scores are a scalar head's rewards at each sequence's last token
                          (train/reward_step.py); `final_model` is the merged sequence-classification model
  grpo                    instruction rows (prompt, reference answer: the output); units: completions; the
                          rollouts, rewards and advantages in `begin_step` (train/grpo_step.py)

Evaluation of a pair objective (`evaluate`) gives eval_loss (the mean pair loss), eval_reward_accuracy and
eval_reward_margin on the held-out pairs, through the same function as training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig
from tuneforge.model.attention import runs_per_sample
from tuneforge.model.lm_loss import sequence_logps
from tuneforge.train.grpo_step import grpo_setup_error
from tuneforge.train.objectives import OBJECTIVES
from tuneforge.train.objectives.reward import sequence_rewards
from tuneforge.train.pair_batches import PairBatches
from tuneforge.train.reference import peft_model
from tuneforge.train.reference_cache import attach_reference_logps
from tuneforge.train.reward_step import final_reward_model, reward_setup_error

PAIR_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")


def check_objective(cfg: RunConfig, data_kind: str) -> None:
    """The objective, the prepared data and the model setup fit together; raise ConfigError with the fix."""
    name = cfg.objective.type
    want = "sft" if name in ("sft", "grpo") else "kto" if name == "kto" else "preference"
    if data_kind != want:
        fix = {
            "preference": "use objective.type=dpo (or ipo, simpo, orpo, reward) for preference pairs",
            "kto": "use objective.type=kto for rows labelled desirable or undesirable",
        }.get(data_kind)
        if fix is None:
            fix = (
                "give rows with prompt, chosen and rejected (see docs/alignment.md)"
                if want == "preference"
                else "give rows {messages, label} (see docs/data.md)"
                if want == "kto"
                else "set objective.type=sft for these rows"
            )
        raise ConfigError(
            f"objective.type={name} trains on {want} data, but the prepared data is {data_kind} data: {fix}"
        )
    if name == "grpo" and grpo_setup_error(cfg):  # grpo's prompts are instruction rows, its answer the reference
        raise ConfigError(grpo_setup_error(cfg))
    if name == "reward" and reward_setup_error(cfg):
        raise ConfigError(reward_setup_error(cfg))
    if name == "reward" and (cfg.eval.generate_rows or cfg.eval.general_text):
        raise ConfigError(
            "eval.generate_rows and eval.general_text measure a language model's text, and a reward run trains a "
            "model that scores pairs (held out: eval_reward_accuracy): remove them"
        )
    if OBJECTIVES.get(name) is not None and OBJECTIVES[name].needs_reference:
        if cfg.adapter.type == "qlora":
            raise ConfigError(
                f"objective.type={name} compares with a reference model; tuneforge takes it from the base weights "
                "of a LoRA/DoRA run (adapter off) or caches it before a full fine-tune, and adapter.type=qlora has "
                "neither yet. Use adapter.type=lora, or a reference-free objective (simpo, orpo)"
            )
        if cfg.adapter.type == "full" and name == "kto":
            raise ConfigError(
                "objective.type=kto compares with a reference model; with adapter.type=full tuneforge caches the "
                "reference's log-probs before training, but KTO's KL pairs depend on each step's rows, so they "
                "cannot be cached. Use adapter.type=lora (or dora)"
            )
        if cfg.adapter.type == "full" and cfg.dist.strategy in ("fsdp2", "deepspeed"):
            raise ConfigError(
                f"objective.type={name} with adapter.type=full caches the reference's log-probs before training, "
                f"from the whole model on one process, which dist.strategy={cfg.dist.strategy} does not hold yet. "
                "Use dist.strategy=ddp (or auto), or adapter.type=lora"
            )
    if name == "kto" and cfg.train.micro_batch_size * cfg.train.grad_accum < 2:
        raise ConfigError(
            "objective.type=kto estimates its KL term from mismatched completions among the rows of a step, and "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x train.grad_accum={cfg.train.grad_accum} gives "
            "one row per step: raise train.micro_batch_size or train.grad_accum so a step holds at least 2 rows"
        )


def writes_text(cfg: RunConfig) -> bool:
    """Whether the trained model generates text (sample generations after training): not a reward model."""
    return cfg.objective.type != "reward"


def build_objective(cfg: RunConfig, data, padding_free: bool, chunked: bool, share_prompt: bool = False):
    """(the objective the loop runs, the collator that builds its batches) for a non-sft objective.type, on the
    prepared `data` (its tokenizer; grpo also decodes and stops generations with it). share_prompt: a pair's
    prompt runs once for both completions, a GRPO group's once for its G (the model runs tuneforge's per-sample
    attention: pair_batches.py, grpo_step.py)."""
    pad_id = data.tokenizer.pad_token_id
    if cfg.objective.type == "kto":
        from tuneforge.train.kto_step import KtoBatches, KtoObjective

        return KtoObjective(cfg, chunked=chunked), KtoBatches(pad_id, padding_free, cfg.data.max_seq_len)
    if cfg.objective.type == "grpo":
        from tuneforge.train.grpo_step import GrpoBatches, GrpoObjective

        return GrpoObjective(cfg, data, chunked=chunked, share_prompt=share_prompt), GrpoBatches(pad_id)
    return PairObjective(cfg, chunked=chunked), PairBatches(pad_id, padding_free, share_prompt)


def collate_step(collate, micro_rows: list[list[dict]]) -> list[dict]:
    """The micro-batches (lists of rows) of one optimizer step as batches. A collator that pairs rows across the
    whole step (KTO's mismatched KL completions: `collate_step`) sees them all at once."""
    whole_step = getattr(collate, "collate_step", None)
    return whole_step(micro_rows) if whole_step is not None else [collate(rows) for rows in micro_rows]


class PairObjective:
    """A preference objective on the loop: `units`, `loss_sum`, `evaluate`."""

    def __init__(self, cfg: RunConfig, chunked: bool = False):
        """chunked: sequence log-probs through the chunked LM head (no (positions x vocab) logits at all)."""
        self.cfg, self.chunked = cfg, chunked
        self.spec = OBJECTIVES[cfg.objective.type]
        self._step_nll_tokens: float | None = None  # ORPO, set by begin_step

    @staticmethod
    def units(batch: dict) -> float:
        return float(batch["num_pairs"])

    def begin_step(
        self, model, batches: list[dict], autocast=contextlib.nullcontext, reduce_sum=None, step: int = 0
    ) -> None:
        """Each pair's loss is its own, except ORPO's NLL term: normalised by the chosen completion tokens per
        pair of the whole step (every micro-batch and process), as one large batch would be."""
        if self.cfg.objective.type != "orpo":
            return
        counts = torch.tensor(
            [float(sum(b["chosen_tokens"] for b in batches)), float(sum(b["num_pairs"] for b in batches))],
            dtype=torch.float64,
            device=next(model.parameters()).device,  # where the process group reduces
        )
        if reduce_sum is not None:
            counts = reduce_sum(counts)
        self._step_nll_tokens = float(counts[0] / counts[1].clamp(min=1))

    @staticmethod
    def step_metrics(sums: dict[str, float], units: float) -> dict[str, float]:
        """Every metric is a mean over the step's pairs."""
        return {k: v / max(units, 1.0) for k, v in sums.items()}

    def prepare_run(self, model, data, run_dir, accelerator, precision: str) -> str | None:
        """Before the first step, with the starting model: a full fine-tune's reference log-probs, cached with the
        data (train/reference_cache.py). Returns a line to log, or None."""
        if not (self.spec.needs_reference and self.cfg.adapter.type == "full"):
            return None
        return attach_reference_logps(self.cfg, run_dir, data, model, accelerator, precision, self.chunked)

    def _logps(self, model, batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")}
        with autocast():
            logps, tokens = sequence_logps(model, inputs, chunked=self.chunked)
        keep = tokens > 0  # a padding tail is a sequence with nothing trained
        logps, tokens = logps[keep], tokens[keep]
        if logps.numel() != 2 * int(batch["num_pairs"]):
            raise RuntimeError(f"expected {2 * int(batch['num_pairs'])} trained sequences, found {logps.numel()}")
        return logps.float(), tokens.float()

    def pair_losses(self, model, batch: dict, autocast=contextlib.nullcontext, nll_tokens: float | None = None):
        """(per-pair losses, metrics) of one batch, differentiable through the policy's log-probs. `model` may be
        wrapped (DDP); the reference is the same weights with the LoRA adapter off. nll_tokens: ORPO's NLL
        normaliser (the step's chosen tokens per pair); default this batch's."""
        o = self.cfg.objective
        if self.spec.scores == "rewards":  # a reward model: its head's output at each sequence's last token
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
            with autocast():
                scores = sequence_rewards(model, inputs).float()
            if scores.numel() != 2 * int(batch["num_pairs"]):
                raise RuntimeError(f"expected {2 * int(batch['num_pairs'])} sequences, found {scores.numel()}")
            return self.spec.loss(scores[0::2], scores[1::2], margin=o.reward_margin)
        logps, tokens = self._logps(model, batch, autocast)
        pc, pr, tc, tr = logps[0::2], logps[1::2], tokens[0::2], tokens[1::2]
        name = o.type
        if self.spec.needs_reference:
            if "ref_chosen_logps" in batch:  # cached before a full fine-tune
                rc, rr = batch["ref_chosen_logps"].to(pc), batch["ref_rejected_logps"].to(pc)
            else:  # the same weights with the LoRA adapter off
                with torch.no_grad(), peft_model(model).disable_adapter():
                    ref, _ = self._logps(model, batch, autocast)
                rc, rr = ref[0::2], ref[1::2]
            if name == "dpo":
                return self.spec.loss(pc, pr, rc, rr, beta=o.beta_value, label_smoothing=o.label_smoothing)
            return self.spec.loss(pc, pr, rc, rr, tc, tr, beta=o.beta_value)
        if name == "simpo":
            return self.spec.loss(
                pc, pr, tc, tr, beta=o.beta_value, gamma=o.simpo_gamma, label_smoothing=o.label_smoothing
            )
        # orpo: the chosen NLL normalised by the completion tokens per pair (of the step in training)
        mean_tokens = tc.mean() if nll_tokens is None else torch.tensor(nll_tokens, dtype=tc.dtype)
        return self.spec.loss(pc, pr, tc, tr, orpo_lambda=o.orpo_lambda, mean_nll_tokens=mean_tokens)

    def loss_sum(self, model, batch: dict, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum of the pair losses, sums of the logged metrics) for a micro-batch."""
        losses, metrics = self.pair_losses(model, batch, autocast, self._step_nll_tokens)
        return losses.sum(), {k: float(v.sum()) for k, v in metrics.items()}

    def final_model(self, model):
        """What final/ holds: the trained model (adapter or full weights); for a reward model the merged
        sequence-classification model (train/reward_step.py)."""
        return final_reward_model(model) if self.spec.scores == "rewards" else model

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size: int, pad_id: int, status: Callable[[str], None] | None = None) -> dict:
        """eval_loss (mean pair loss), eval_reward_accuracy, eval_reward_margin and eval_pairs over `rows` (a
        reward model: its pairwise accuracy and mean reward margin)."""
        was_training = model.training
        model.eval()
        collate = PairBatches(pad_id, padding_free=True, share_prompt=runs_per_sample(model))
        device = next(model.parameters()).device
        total = acc = margin = 0.0
        n = 0
        for b in range(0, len(rows), batch_size):
            chunk = rows.select(range(b, min(b + batch_size, len(rows))))
            batch = {k: v.to(device) for k, v in collate(list(chunk)).items()}
            batch.pop("num_tokens"), batch.pop("num_attended")
            losses, metrics = self.pair_losses(model, batch)
            total += float(losses.sum())
            acc += float(metrics["rewards/accuracies"].sum())
            margin += float(metrics["rewards/margins"].sum())
            n += len(chunk)
            if status is not None:
                status(f"evaluating {n}/{len(rows)} pairs")
        if was_training:
            model.train()
        n = max(n, 1)
        return {
            "eval_loss": total / n,
            "eval_reward_accuracy": acc / n,
            "eval_reward_margin": margin / n,
            "eval_pairs": n,
        }
