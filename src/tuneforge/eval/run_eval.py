"""What a training run measures, for the recipe (train/recipe.py) and the loop, which get it passed in:

  loss(model)            held-out loss / perplexity: before training, every eval.every_steps, after
  general_text(model)    the forgetting check: perplexity on eval.general_text, before and after
  tasks(model)           task metrics on eval.generate_rows generations (exact match, ROUGE-L, ...), before and after
  samples(model)         eval.show_samples prompts with their reference and the model's answer, shown at the end

The same functions `tuneforge eval` uses (eval/runner.py), so a run's table and a later eval agree.
"""

from __future__ import annotations

from collections.abc import Callable

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import PaddedCollator
from tuneforge.eval.general_text import general_text_perplexity, general_text_windows
from tuneforge.eval.generation import generate
from tuneforge.eval.perplexity import evaluate_loss
from tuneforge.eval.runner import held_out_chats, task_eval


class RunEvaluation:
    def __init__(self, cfg: RunConfig, data):
        """`data`: the run's PreparedData (held-out rows, tokenizer, data report)."""
        self.cfg, self.data = cfg, data
        self.stop_ids = data.report.get("stop_token_ids")
        self._windows = None

    @property
    def held_out(self) -> bool:
        """Whether the run has held-out rows (data.eval or data.eval_fraction)."""
        return self.data.eval is not None

    def loss(self, model, status: Callable[[str], None] | None = None) -> dict:
        """eval_loss, eval_ppl, eval_tokens over every held-out row; `status` gets "evaluating n/N rows"."""
        done = [0]

        def tick(rows: int) -> None:
            done[0] += rows
            if status is not None:
                status(f"evaluating {done[0]}/{len(self.data.eval)} rows")

        device = next(model.parameters()).device
        return evaluate_loss(
            model,
            self.data.eval,
            PaddedCollator(self.data.tokenizer.pad_token_id),
            self.cfg.eval.batch_size,
            device,
            on_batch=tick,
        )

    def general_text(self, model) -> dict:
        """general_ppl / general_tokens on eval.general_text, or nothing when the key is unset."""
        ev = self.cfg.eval
        if not ev.general_text:
            return {}
        if self._windows is None:
            self._windows = general_text_windows(
                ev.general_text, self.data.tokenizer, ev.general_text_tokens, self.cfg.data.max_seq_len
            )
        return general_text_perplexity(model, self._windows, ev.batch_size, self.data.tokenizer.pad_token_id)

    def tasks(self, model) -> dict:
        """Task metrics on eval.generate_rows held-out generations, or nothing when it is 0."""
        if not self.cfg.eval.generate_rows:
            return {}
        metrics, _ = task_eval(
            model, self.data.tokenizer, self.data.eval, self.cfg.eval, self.stop_ids, self.cfg.eval.generate_rows
        )
        return metrics

    def samples(self, model) -> list[dict]:
        """eval.show_samples greedy answers ({"prompt", "reference", "generated"}) to held-out prompts (training
        prompts when there are none)."""
        rows = self.data.eval if self.data.eval is not None else self.data.train
        prompts, refs = held_out_chats(rows, self.cfg.eval.show_samples)
        if not prompts:
            return []
        preds = generate(model, self.data.tokenizer, prompts, self.cfg.eval.max_new_tokens, self.stop_ids)
        return [{"prompt": p[-1]["content"], "reference": r, "generated": g} for p, r, g in zip(prompts, refs, preds)]
