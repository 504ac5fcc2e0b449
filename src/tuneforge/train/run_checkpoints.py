"""One run's checkpoints as it trains: saved, resumed from, the best one loaded at the end.

A save that fails (any writer's error: disk full, read-only, quota; OSError, torch.save's RuntimeError,
safetensors' SafetensorError) is reported whatever log.progress is, counted in TrainState.failed_saves, and
survived: the previous checkpoint stays the one a resume starts from. Free space is watched: a warning when the
checkpoint directory has less than a checkpoint needs (estimated before the first is written, measured after)."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.train.alerts import alert, error_text, save_failed_message
from tuneforge.train.checkpoint import (
    CheckpointError,
    TrainState,
    check_resume_key,
    find_latest,
    load_checkpoint,
    load_weights_only,
    prune,
    read_manifest,
    save_checkpoint,
    step_dir_name,
)
from tuneforge.train.disk_space import directory_bytes, low_space_warning
from tuneforge.train.signals import TrainingStopped


class RunCheckpoints:
    def __init__(self, root: Path, cfg, accelerator, parallel, optimizer, scheduler, monitor, estimate_bytes: int):
        self.root, self.cfg, self.acc, self.parallel = Path(root), cfg, accelerator, parallel
        self.optimizer, self.scheduler, self.monitor = optimizer, scheduler, monitor
        self.is_main = accelerator.is_main_process
        self.need_bytes, self.measured = estimate_bytes, False  # what one checkpoint takes on disk
        self.low_space = False

    def save(self, st: TrainState, resume_key: dict) -> Path | None:
        """Checkpoint the current step; None when it could not be written (said, counted, and survived)."""
        acc = self.acc
        try:
            path = save_checkpoint(
                self.root,
                st.step,
                model=self.parallel.module(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=getattr(acc, "scaler", None),
                state=st,
                resume_key=resume_key,
                is_main=self.is_main,
                rank=acc.process_index,
                barrier=acc.wait_for_everyone,
                shards=self.parallel.save_shards,
                any_failed=self.any_failed,
            )
        except TrainingStopped:
            raise
        except Exception as e:  # noqa: BLE001 - every writer's error; KeyboardInterrupt and SystemExit go through
            st.failed_saves += 1
            latest = find_latest(self.root)
            try:  # metrics.jsonl may sit on the same full disk
                self.monitor.write({"type": "checkpoint_failed", "step": st.step, "error": error_text(e)})
            except OSError:
                pass
            if self.is_main or not isinstance(e, CheckpointError):  # the main process, or the rank that failed
                where = "" if self.is_main else f"rank {acc.process_index}: "
                alert(self.monitor, where + save_failed_message(st.step, e, self.root, latest, st.failed_saves))
            return None
        if self.is_main:
            ck = self.cfg.checkpoint
            want_best = ck.keep_best or self.cfg.eval.load_best_at_end
            prune(self.root, ck.save_total_limit, {st.best_step} if want_best and st.best_step is not None else set())
            self.check_space(path)
        self.monitor.write({"type": "checkpoint", "step": st.step, "path": str(path)})
        return path

    def any_failed(self, failed_here: bool) -> bool:
        """Whether any process failed its part of a save (a collective in multi-process runs)."""
        if self.acc.num_processes == 1:
            return failed_here
        flag = torch.tensor([float(failed_here)], device=self.acc.device)
        return bool(self.acc.reduce(flag, "sum").item() > 0)

    def check_space(self, written: Path | None) -> None:
        """Warn (once, until space recovers) when the checkpoint directory has less free space than a checkpoint
        needs: the size of `written` once one exists, the estimate before."""
        if not self.is_main:
            return
        if written is not None and written.is_dir():
            self.need_bytes, self.measured = directory_bytes(written), True
        try:
            warning = low_space_warning(self.root, self.need_bytes, self.measured)
        except OSError:
            return
        if warning and not self.low_space:
            alert(self.monitor, warning)
        self.low_space = warning is not None

    def resume(self, path: str | Path, resume_key: dict, total_steps: int, log) -> TrainState:
        """Weights, optimizer, schedule, RNG and counters from checkpoint `path`, after checking that nothing the
        checkpoint cannot follow changed (CheckpointError naming each setting otherwise)."""
        path, acc = Path(path), self.acc
        changes = check_resume_key(path, read_manifest(path).get("resume_key", {}), resume_key)
        state = load_checkpoint(
            path,
            model=self.parallel.module(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=getattr(acc, "scaler", None),
            rank=acc.process_index,
            shards=self.parallel.load_shards,
        )
        if self.is_main:
            self.monitor.truncate_after(state.step)
        log(
            f"resuming from {path} (step {state.step} of {total_steps}, {state.tokens_total:,} tokens seen)"
            + ("; changed since: " + "; ".join(changes) if changes else "")
        )
        return state

    def load_best(self, st: TrainState) -> None:
        """The weights of the best checkpoint (eval.load_best_at_end), so that final/ holds them."""
        best = self.root / step_dir_name(st.best_step)
        if not load_weights_only(best, self.parallel.module(), self.parallel.load_shards):
            self.monitor.event(f"warning: best checkpoint {best} is missing; final/ holds the last step")
            return
        self.monitor.event(f"loaded the best checkpoint {best.name} ({self.cfg.eval.metric}={st.best_metric:.4g})")
