"""How the loop runs KTO (objective.type: kto) on prepared unpaired rows: prompt_ids, completion_ids, label.

A batch holds each row's sequence, prompt + completion (only the completion trained), and its mismatched KL
sequence: the row's prompt with the completion of the row before it, cyclically, among the rows of the optimizer
step on this process in the step's order (`KtoBatches.collate_step`; a KL completion is cut to fit
data.max_seq_len). TRL 1.16's KTOTrainer builds the same pairs within each batch (`KL_completion_ids`: the
completions rotated by one). Per optimizer step:

  begin_step    no_grad: the policy's log-probs of every KL sequence, the reference's (LoRA adapter off) of every KL
                and matched sequence; the KL estimate z = max(0, mean over the step's rows on every process of
                log pi(y'|x) - log ref(y'|x)), one number for the whole step, detached (as TRL's)
  loss_sum      the policy's log-probs of the matched sequences (with gradient), `kto_loss` per row with that z
  step_metrics  rewards/logps of the desirable rows averaged over the desirable rows (`chosen`), of the
                undesirable over the undesirable (`rejected`), their margin, kl, rewards/accuracies (the reward's
                sign agrees with the label)

TRL estimates z per micro-batch (and averages it over processes); tuneforge over the whole step, so that
micro-batch x accumulation gives the same steps. With grad_accum 1 and one process the two are the same numbers.
With several processes each one pairs the rows it holds (TRL: each device its batch) and z averages every pair.

Held-out evaluation (`evaluate`) pairs the held-out rows the same way (all of them in order, whatever
eval.batch_size) and reports eval_loss (mean row loss with one z), eval_kl, eval_reward_margin and
eval_reward_auc: the share of (desirable, undesirable) held-out rows whose implied rewards beta (log pi - log ref)
are ordered rightly, ties counting one half (0.5 at the start of a LoRA run, where every reward is 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.data.templates import IGNORE_INDEX
from tuneforge.model.lm_loss import sequence_logps
from tuneforge.train.objectives.kto import kto_loss, mismatched_completion_index
from tuneforge.train.reference import peft_model

MODEL_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


def _sequence(prompt: list[int], completion: list[int]) -> dict:
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


class KtoBatches:
    """Prepared KTO rows -> batches of their sequences (input_ids, labels, ...), their KL sequences (the same keys
    prefixed `kl_`), `desirable` (bool per row) and `num_rows`. `collate_step` pairs the KL completions across all
    the micro-batches of a step; calling the collator on one list of rows pairs within it.

    Example: rows with prompts [P0, P1, P2] and completions [C0, C1, C2] in one step give the sequences P0 C0,
    P1 C1, P2 C2 (trained: C) and the KL sequences P0 C2, P1 C0, P2 C1."""

    def __init__(self, pad_id: int, padding_free: bool, max_seq_len: int):
        self.inner = FlatCollator(pad_id) if padding_free else PaddedCollator(pad_id)
        self.max_seq_len = max_seq_len

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate_step([rows])[0]

    def collate_step(self, micro_rows: list[list[dict]]) -> list[dict[str, torch.Tensor]]:
        step = [r for rows in micro_rows for r in rows]
        other = mismatched_completion_index(len(step))
        batches, k = [], 0
        for rows in micro_rows:
            matched, mismatched = [], []
            for r in rows:
                prompt = list(r["prompt_ids"])
                matched.append(_sequence(prompt, list(r["completion_ids"])))
                room = max(1, self.max_seq_len - len(prompt))
                mismatched.append(_sequence(prompt, list(step[other[k]]["completion_ids"])[:room]))
                k += 1
            batch = self.inner(matched)
            kl = self.inner(mismatched)
            batch.update({f"kl_{n}": kl[n] for n in MODEL_KEYS if n in kl})
            batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
            batch["num_rows"] = torch.tensor(len(rows))
            batches.append(batch)
        return batches


def pairwise_auc(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of (chosen, rejected) couples with chosen > rejected, ties counting 1/2."""
    c, r = chosen.double()[:, None], rejected.double()[None, :]
    return float(((c > r).double() + 0.5 * (c == r).double()).mean())


class KtoObjective:
    """KTO on the loop: `units` (rows), `begin_step` (the step's KL estimate and reference log-probs), `loss_sum`,
    `step_metrics`, `evaluate`."""

    def __init__(self, cfg: RunConfig, chunked: bool = False):
        """chunked: sequence log-probs through the chunked LM head (no (positions x vocab) logits at all)."""
        self.cfg, self.chunked = cfg, chunked
        o = cfg.objective
        self.beta = o.beta_value
        self.weights = {"desirable_weight": o.kto_desirable_weight, "undesirable_weight": o.kto_undesirable_weight}

    @staticmethod
    def units(batch: dict) -> float:
        return float(batch["num_rows"])

    def _logps(self, model, batch: dict, prefix: str, autocast) -> torch.Tensor:
        inputs = {
            k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix) and k[len(prefix) :] in MODEL_KEYS
        }
        with autocast():
            logps, tokens = sequence_logps(model, inputs, chunked=self.chunked)
        logps = logps[tokens > 0]  # a padding tail is a sequence with nothing trained
        if logps.numel() != int(batch["num_rows"]):
            raise RuntimeError(f"expected {int(batch['num_rows'])} trained {prefix}sequences, found {logps.numel()}")
        return logps.float()

    @torch.no_grad()
    def begin_step(
        self,
        model,
        batches: list[dict],
        autocast=contextlib.nullcontext,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        step: int = 0,
    ) -> None:
        """Before any loss of a step: sets `kl` (the step's z, over every process through `reduce_sum`) and
        `ref_logps` (the reference's log-probs of the matched sequences, unless the batch has them) in each batch."""
        device = next(model.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of the KL log-ratios, rows
        for batch in batches:
            on = {k: v.to(device) for k, v in batch.items()}
            policy_kl = self._logps(model, on, "kl_", autocast)
            with peft_model(model).disable_adapter():
                reference_kl = self._logps(model, on, "kl_", autocast)
                if "ref_logps" not in batch:
                    batch["ref_logps"] = self._logps(model, on, "", autocast).cpu()
            total += torch.stack([(policy_kl - reference_kl).double().sum(), total.new_tensor(len(policy_kl))])
        if reduce_sum is not None:
            total = reduce_sum(total)
        z = (total[0] / total[1].clamp(min=1)).clamp(min=0).cpu()
        for batch in batches:
            batch["kl"] = z

    def row_losses(self, model, batch: dict, autocast=contextlib.nullcontext):
        """(per-row losses, kto_loss's metrics) of a batch that `begin_step` has seen, differentiable through the
        policy's log-probs."""
        if "kl" not in batch:
            self.begin_step(model, [batch], autocast)
        policy = self._logps(model, batch, "", autocast)
        reference = batch["ref_logps"].to(policy)
        desirable = batch["desirable"].to(policy.device)
        return kto_loss(policy, reference, desirable, self.beta, kl=batch["kl"].to(policy.device), **self.weights)

    def loss_sum(self, model, batch: dict, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum of the row losses, sums of the logged metrics and the counts they are averaged over)."""
        losses, m = self.row_losses(model, batch, autocast)
        desirable = batch["desirable"]
        sums = {
            "rewards/chosen": float(m["rewards/chosen"].sum()),
            "rewards/rejected": float(m["rewards/rejected"].sum()),
            "logps/chosen": float(m["logps/chosen"].sum()),
            "logps/rejected": float(m["logps/rejected"].sum()),
            "rewards/accuracies": float(m["rewards/accuracies"].sum()),
            "kl": float(m["kl"]) * len(desirable),
            "rows/desirable": float(desirable.sum()),
            "rows/undesirable": float((~desirable.bool()).sum()),
        }
        return losses.sum(), sums

    @staticmethod
    def step_metrics(sums: dict[str, float], units: float) -> dict[str, float]:
        """The step's logged metrics from the sums of every micro-batch and process: chosen over the desirable
        rows, rejected over the undesirable (absent when the step has none), the rest over all rows."""
        out = {k: sums[k] / max(units, 1.0) for k in ("kl", "rewards/accuracies") if k in sums}
        for side, rows in (("chosen", "rows/desirable"), ("rejected", "rows/undesirable")):
            if sums.get(rows):
                out[f"rewards/{side}"] = sums[f"rewards/{side}"] / sums[rows]
                out[f"logps/{side}"] = sums[f"logps/{side}"] / sums[rows]
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    @staticmethod
    def prepare_run(model, data, run_dir, accelerator, precision: str) -> None:
        """Nothing before the first step: the reference is the LoRA adapter switched off."""

    @staticmethod
    def final_model(model):
        """final/ holds the trained adapter (or weights) as for SFT."""
        return model

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size: int, pad_id: int, status: Callable[[str], None] | None = None) -> dict:
        """eval_loss (mean row loss), eval_kl, eval_reward_margin, eval_reward_auc and eval_rows over `rows`."""
        was_training = model.training
        model.eval()
        collate = KtoBatches(pad_id, padding_free=True, max_seq_len=self.cfg.data.max_seq_len)
        chunks = [list(rows.select(range(b, min(b + batch_size, len(rows))))) for b in range(0, len(rows), batch_size)]
        batches = collate.collate_step(chunks)
        for batch in batches:
            batch.pop("num_tokens"), batch.pop("num_attended")
        if status is not None:
            status(f"evaluating {len(rows)} rows: the KL estimate")
        self.begin_step(model, batches)
        device = next(model.parameters()).device
        total, n, chosen, rejected = 0.0, 0, [], []
        for batch in batches:
            losses, m = self.row_losses(model, {k: v.to(device) for k, v in batch.items()})
            total += float(losses.sum())
            chosen.append(m["rewards/chosen"].cpu())
            rejected.append(m["rewards/rejected"].cpu())
            n += len(losses)
            if status is not None:
                status(f"evaluating {n}/{len(rows)} rows")
        if was_training:
            model.train()
        result = {"eval_loss": total / max(n, 1), "eval_kl": float(batches[0]["kl"]) if batches else 0.0}
        chosen, rejected = torch.cat(chosen) if chosen else None, torch.cat(rejected) if rejected else None
        if chosen is not None and len(chosen) and len(rejected):
            result["eval_reward_margin"] = float(chosen.mean() - rejected.mean())
            result["eval_reward_auc"] = pairwise_auc(chosen, rejected)
        result["eval_rows"] = n
        return result
