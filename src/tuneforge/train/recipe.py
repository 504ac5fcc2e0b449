"""THE run, objective-agnostic, read top to bottom:

  setup            the prepared data (rank 0 prepares it, the others wait), the memory plan (which settles
                   train.gradient_checkpointing: auto), the model and the loop (loop.Trainer)
  evaluate before  held-out loss, the forgetting check, task metrics (eval/run_eval.py); a resumed run reuses
                   what it recorded at step 0
  train            the loop, from step 1 or a checkpoint
  evaluate after   the same measurements on the trained weights, and the sample generations
  final/           weights + tokenizer, atomically (a failure names the last good checkpoint: exit 1)
  summary          the printed result, run_summary.json, and the warnings a run must not keep quiet
  report           report.md / report.html with plots

`tuneforge train` (cli/train_commands.py) parses arguments, resolves the resume point and calls `Recipe.run`.
What is evaluated is passed in (a RunEvaluation), so an objective changes what it measures, not this shape.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.config.load import write_resolved_config
from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import PreparedData, prepare, wait_for_prepared
from tuneforge.eval.general_text import forgetting_line
from tuneforge.eval.report import write_report_quietly
from tuneforge.eval.run_eval import RunEvaluation
from tuneforge.eval.runner import comparison_table
from tuneforge.progress import stage_status
from tuneforge.train.alerts import end_of_run_warnings
from tuneforge.train.final import FinalWriteError
from tuneforge.train.loop import Trainer
from tuneforge.train.objective_step import build_objective, writes_text
from tuneforge.train.planner import available_bytes, check_fits, plan_for_run


class Recipe:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        resume_from: Path | None,
        is_main: bool = True,
        command: str = "tuneforge train CONFIG",
    ):
        """`command`: how the user started the run, repeated in messages that tell them to run it again."""
        self.cfg, self.run_dir, self.resume_from, self.is_main, self.command = (
            cfg,
            run_dir,
            resume_from,
            is_main,
            command,
        )
        self.say: Callable[..., None] = print if is_main else (lambda *a, **k: None)

    def run(self) -> int:
        """The whole run; the exit code of `tuneforge train` (0, or 1 when final/ could not be written)."""
        data = self.prepare_data()
        self.settle_checkpointing()
        evaluation = RunEvaluation(self.cfg, data)
        self.held_out_loss = held_out_loss(self.cfg, data, evaluation)
        trainer = Trainer(
            self.cfg, self.run_dir, data, self.held_out_loss if evaluation.held_out else None, log=self.say
        ).setup()
        final = final_error = None
        try:
            model = trainer.parallel.module()
            # a sharded model (FSDP2, ZeRO-3) runs a forward pass on every rank together, generation included
            generates = self.is_main or trainer.parallel.sharded
            before = self.evaluate_before(trainer, evaluation, model, generates)
            summary = trainer.train(self.resume_from)
            after = self.evaluate_after(trainer, evaluation, model, generates, summary)
            samples = []
            if self.cfg.eval.show_samples and generates and writes_text(self.cfg):
                with trainer.parallel.generation():
                    samples = evaluation.samples(model)
            try:
                final = trainer.save_final()
            except FinalWriteError as e:  # the run is not lost: the message names the last good checkpoint
                final_error = e
        finally:
            trainer.cleanup()
        if not self.is_main:
            trainer.finish()
            return 0
        self.write_summary(summary, before, after, samples)
        if final_error is not None:
            trainer.finish()
            print(f"error: {final_error}\n  the command: {self.command}", file=sys.stderr)
            return final_error.exit_code
        write_report_quietly(self.run_dir)
        trainer.finish()
        try_it = (
            f'tuneforge generate {self.run_dir} --prompt "..."'
            if writes_text(self.cfg)
            else "transformers.AutoModelForSequenceClassification.from_pretrained on it"
        )
        print(f"\nsaved {final} (try: {try_it})")
        return 0

    # ------------------------------------------------------------------------ setup
    def prepare_data(self) -> PreparedData:
        if not self.is_main:
            return wait_for_prepared(self.cfg, self.run_dir, timeout_s=60 * self.cfg.dist.timeout_minutes)
        write_resolved_config(self.cfg, self.run_dir)
        with stage_status("preparing data", self.cfg.log.progress) as log:
            return prepare(self.cfg, self.run_dir, log=log)

    def settle_checkpointing(self) -> None:
        """Before loading the model: will it fit, and does train.gradient_checkpointing=auto turn checkpointing on?"""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        plan = None
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))  # sharded strategies divide by it
            plan = plan_for_run(self.cfg, self.run_dir, device, available_bytes(device), gpus=world)
        except Exception as e:  # noqa: BLE001 - the plan is advice; a model it cannot build is loaded anyway
            if self.is_main:
                print(f"memory plan skipped ({type(e).__name__}: {e})", file=sys.stderr)
        if self.cfg.train.gradient_checkpointing == "auto":
            self.cfg.train.gradient_checkpointing = plan.checkpointing if plan else False
            self.say(plan.notes[0] if plan else "gradient checkpointing off (auto: no memory plan)")
        warning = check_fits(plan) if plan is not None and self.is_main else None
        if warning:
            print(f"warning: {warning}", file=sys.stderr)

    # ------------------------------------------------------------------------ evaluation
    def evaluate_before(self, trainer: Trainer, evaluation: RunEvaluation, model, generates: bool) -> dict:
        if self.resume_from:
            return recorded_start_eval(trainer.monitor.path)
        if not (evaluation.held_out and self.cfg.eval.at_start):
            return {}
        before = {**self.held_out_loss(model, trainer.monitor.status), **evaluation.general_text(model)}
        if generates:
            with trainer.parallel.generation():
                before.update(evaluation.tasks(model))
        trainer.monitor.write({"type": "eval", "step": 0, **before})
        self.say("before training: " + "  ".join(f"{k}={v:.4g}" for k, v in before.items()))
        return before

    def evaluate_after(
        self, trainer: Trainer, evaluation: RunEvaluation, model, generates: bool, summary: dict
    ) -> dict:
        after = {k: v for k, v in summary.items() if k.startswith("eval_")}  # the loop's last loss eval
        if not evaluation.held_out:
            return after
        if self.cfg.eval.at_start:
            after.update(evaluation.general_text(model))
        if self.cfg.eval.generate_rows and generates:
            with trainer.parallel.generation():
                after.update(evaluation.tasks(model))
            trainer.monitor.write({"type": "eval", "step": trainer.total_steps, **after})
        return after

    # ------------------------------------------------------------------------ summary
    def write_summary(self, summary: dict, before: dict, after: dict, samples: list[dict]) -> None:
        print(
            f"\ntrained {summary['steps']} steps in {summary['wall_s']:.1f}s "
            f"({summary['tokens_per_s']:,.0f} tokens/s); loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}"
        )
        if before and after:
            print("\n" + comparison_table(before, after, ("before", "after")))
        forgetting = forgetting_line(before, after, self.cfg.eval.general_text)
        if forgetting:
            print(forgetting)
        if samples:
            print("\nsample generations:")
            for s in samples:
                print(f"  prompt:    {s['prompt']!r}\n  expected:  {s['reference']!r}\n  generated: {s['generated']!r}")
        for line in end_of_run_warnings(summary, self.run_dir):
            print(line, file=sys.stderr)
        path = self.run_dir / "run_summary.json"
        try:
            path.write_text(json.dumps({"before": before, "after": after, **summary, "samples": samples}, indent=2))
        except OSError as e:
            print(f"warning: {path} could not be written ({e})", file=sys.stderr)


def held_out_loss(cfg: RunConfig, data: PreparedData, evaluation: RunEvaluation):
    """The held-out measurement the objective trains for: eval_loss / eval_ppl of the trained tokens (sft), or
    the objective's own `evaluate` (a preference objective: the mean pair loss with reward accuracy and margin)."""
    if cfg.objective.type == "sft":
        return evaluation.loss
    # the chunked head needs the head's weight whole on this rank: not with FSDP2 / ZeRO shards
    chunked = cfg.train.logits == "chunked" and cfg.dist.strategy in ("auto", "ddp")
    pad = data.tokenizer.pad_token_id
    objective, _ = build_objective(cfg, data, padding_free=True, chunked=chunked)

    def objective_eval(model, status=None) -> dict:
        return objective.evaluate(model, data.eval, cfg.eval.batch_size, pad, status)

    return objective_eval


def recorded_start_eval(metrics_path: Path) -> dict:
    """The before-training eval a resumed run recorded at step 0."""
    if not metrics_path.exists():
        return {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "eval" and rec.get("step") == 0:
            return {k: v for k, v in rec.items() if k not in ("type", "step", "time_s")}
    return {}
