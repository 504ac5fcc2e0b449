"""STAGE: the training loop. One loop for LoRA, DoRA and full fine-tuning, on `accelerate`.

Read it top to bottom: `setup()` builds the parts (device, model, adapter, optimizer, schedule, data
order), `train()` runs optimizer steps, `save_final()` writes `<run>/final` in Hugging Face format.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from tuneforge import __version__
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import FlatCollator, PackedCollator, PaddedCollator, rows_at
from tuneforge.data.formats import column
from tuneforge.data.preference import prepared_kind
from tuneforge.data.prepare import PreparedData
from tuneforge.model.adapters import describe, trainable_report
from tuneforge.model.attention import check_samples_kept_apart, packed_calls, samples_share_rows, use_packed_sdpa
from tuneforge.model.lm_loss import forward_logits, nll_sum, trained_nll_sum, trained_tokens
from tuneforge.model.load import choose_precision
from tuneforge.train.alerts import final_failed_message
from tuneforge.train.batches import BatchOrder, join_micro_batches, pass_budget
from tuneforge.train.checkpoint import TrainState, find_latest, flat_config
from tuneforge.train.disk_space import estimate_checkpoint_bytes
from tuneforge.train.final import FinalWriteError, write_final
from tuneforge.train.host_memory import keep_freed_memory
from tuneforge.train.model_setup import build_model
from tuneforge.train.monitor import Monitor
from tuneforge.train.objective_step import build_objective, check_objective, collate_step
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.parallel import build_parallel
from tuneforge.train.planner import resolve_auto_checkpointing
from tuneforge.train.run_checkpoints import RunCheckpoints
from tuneforge.train.signals import StopSignals, TrainingStopped
from tuneforge.train.step_records import record_bad_step, record_eval, should_stop_early, track_loss
from tuneforge.train.throughput import MfuMeter, default_threads, device_peak_tflops, flop_model, peak_memory_gb
from tuneforge.train.trackers import open_trackers

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        data: PreparedData,
        evaluate: Callable[[torch.nn.Module, Callable[[str], None]], dict] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.run_dir, self.data, self.evaluate, self.log = cfg, Path(run_dir), data, evaluate, log

    # ------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        cfg = self.cfg
        # ---- device, precision, threads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = choose_precision(cfg.train.precision, device)
        # a collective that waits longer than dist.timeout_minutes fails the job instead of hanging it
        timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist.timeout_minutes))
        # step_scheduler_with_optimizer=False: accelerate would otherwise advance the schedule num_processes
        # times per optimizer step (it assumes the per-rank batch count shrinks with the world size; ours doesn't)
        self.accelerator = Accelerator(
            cpu=device == "cpu",
            mixed_precision=MIXED_PRECISION[self.precision],
            kwargs_handlers=[timeout],
            step_scheduler_with_optimizer=False,
        )
        self.device = device
        if device == "cpu":
            torch.set_num_threads(cfg.train.threads or default_threads(self.accelerator.num_processes))
            self.log(keep_freed_memory())  # activations reused without page faults (train/host_memory.py)
        self.is_main = self.accelerator.is_main_process
        # how the model is spread over the processes (dist.strategy): DDP, FSDP2 or DeepSpeed ZeRO
        self.parallel = build_parallel(self.accelerator, cfg, self.precision, device)
        self.parallel.before_load()

        # ---- model and adapter
        if cfg.train.gradient_checkpointing == "auto":  # settled by `tuneforge train` already; direct use settles here
            self.log(resolve_auto_checkpointing(cfg, device, self.accelerator.num_processes))
        model, attention = build_model(
            cfg,
            self.run_dir,
            self.data.tokenizer,
            self.accelerator,
            self.precision,
            device,
            self.parallel.sharded,
            self.log,
        )
        self.params_report = trainable_report(model)
        ckpt_bytes = estimate_checkpoint_bytes(model, cfg.train.optimizer)
        self.flops = flop_model(model)
        self.peak_tflops, peak_source = device_peak_tflops(device, self.precision, cfg.train.peak_tflops)
        self.mfu = MfuMeter(self.peak_tflops, peak_source, self.accelerator.num_processes)
        self.log(
            f"model: {cfg.model.name_or_path or cfg.model.init.architecture + ' (new)'} on {device}, "
            f"precision {self.precision}, attention {attention}, {torch.get_num_threads()} threads; "
            f"{describe(self.params_report)}; MFU against {self.peak_tflops:.3g} TFLOP/s ({peak_source})"
        )

        # ---- data order and length of the run
        packed = "position_ids" in self.data.train.column_names
        lengths = None
        if cfg.train.group_by_length and not packed:
            lengths = tuple(column(self.data.train, "num_tokens"))
        self.order = BatchOrder(
            len(self.data.train),
            cfg.train.micro_batch_size,
            cfg.train.seed,
            self.accelerator.num_processes,
            self.accelerator.process_index,
            cfg.train.grad_accum,
            lengths,
        )
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.order.batches_per_epoch / cfg.train.grad_accum)
        )
        flat = cfg.train.padding_free
        self.collate = (FlatCollator if flat else PackedCollator if packed else PaddedCollator)(
            self.data.tokenizer.pad_token_id
        )
        # rows holding several samples: attention per sample (SDPA on each slice) instead of a block mask
        self.per_sample_sdpa = (flat or packed) and use_packed_sdpa(model)
        # LM head + loss in row chunks needs the head's weight whole on this rank (not FSDP2 / ZeRO-3 shards)
        self.chunked_head = cfg.train.logits == "chunked" and not self.parallel.sharded
        # the objective: sft inline below; another builds its own batches and loss (train/objective_step.py)
        check_objective(cfg, prepared_kind(self.data.report))
        self.objective = None
        if cfg.objective.type != "sft":
            self.objective, self.collate = build_objective(
                cfg, self.data, flat, self.chunked_head, share_prompt=self.per_sample_sdpa
            )
            note = self.objective.prepare_run(model, self.data, self.run_dir, self.accelerator, self.precision)
            if note:  # e.g. a full fine-tune's reference log-probs, cached with the data before any update
                self.log(note)
        self._checked_per_sample = not (flat or packed)
        # optimizer updates per step: grpo may update several times on one rollout batch (the schedule counts updates)
        self.updates_per_step = getattr(self.objective, "updates_per_step", 1)
        # a step's micro-batches joined into larger passes (one process, not DeepSpeed: see train.pass_tokens)
        self.pass_positions, note = pass_budget(cfg, self.accelerator.num_processes, self.parallel.name)
        if note:
            self.log(note)

        # ---- optimizer and schedule
        self.model, self.optimizer, self.scheduler = self.parallel.wrap(
            model,
            lambda m: build_optimizer(m, cfg.train),
            lambda o: build_scheduler(o, cfg.train, self.total_steps * self.updates_per_step),
        )
        # what actually wraps the model (DistributedDataParallel, FSDP..., DeepSpeedEngine), recorded in the summary
        self.wrapper = self.parallel.wrapper
        self.local_fraction = self.parallel.local_fraction()
        for note in getattr(self.parallel, "notes", []):
            self.log(f"deepspeed: {note}")
        if self.accelerator.num_processes > 1 or self.parallel.name != "ddp":
            self.log(
                f"distributed: {self.accelerator.num_processes} processes, {self.wrapper}, backend "
                f"{torch.distributed.get_backend() if torch.distributed.is_initialized() else 'none'}; "
                f"global micro-batch "
                f"{cfg.train.micro_batch_size * self.accelerator.num_processes} rows; this rank holds "
                f"{self.local_fraction:.1%} of the parameters"
            )
        # trackers (log.report_to) on the main process; a run with checkpoints continues its tracker runs
        trackers = (
            open_trackers(
                cfg.log,
                self.run_dir,
                flat_config(cfg.model_dump(mode="json")),
                resume=find_latest(self.ckpt_root) is not None,
            )
            if self.is_main
            else []
        )
        self.monitor = Monitor(
            self.run_dir, self.total_steps, cfg.log.every_steps, cfg.log.progress, self.is_main, trackers=trackers
        )
        self.checkpoints = RunCheckpoints(
            self.ckpt_root,
            cfg,
            self.accelerator,
            self.parallel,
            self.optimizer,
            self.scheduler,
            self.monitor,
            ckpt_bytes,
        )
        self.state = TrainState()
        return self

    # ------------------------------------------------------------------------ one optimizer step
    def _step(self, step: int) -> dict:
        """Forward/backward over grad_accum micro-batches (joined into fewer passes up to train.pass_tokens), then
        one optimizer update. A step whose loss or gradient is not finite updates nothing (its gradients are
        dropped) and returns skipped=True."""
        acc, cfg = self.accelerator, self.cfg.train
        first = (step - 1) * cfg.grad_accum
        micro = [rows_at(self.data.train, self.order.micro_batch(first + i)) for i in range(cfg.grad_accum)]
        if self.pass_positions:
            micro = join_micro_batches(micro, self.pass_positions, flat=self.cfg.train.padding_free)
        micro = collate_step(self.collate, micro)
        real_tokens = sum(int(b.pop("num_tokens")) for b in micro)
        attended = sum(int(b.pop("num_attended")) for b in micro)
        local_trained = sum(trained_tokens(b["labels"]) for b in micro)
        obj = self.objective  # None: sft, normalised by trained tokens; else by the objective's units (pairs)
        local_units = local_trained if obj is None else sum(obj.units(b) for b in micro)
        head_positions = local_trained if cfg.logits != "full" else sum(b["input_ids"].numel() for b in micro)
        flops = self.flops.step_flops(real_tokens, local_trained, attended, head_positions)
        # token-normalised over the whole step: every micro-batch and every rank (one all-reduce for the counts)
        counts = [float(local_units), float(real_tokens), float(flops), float(local_trained)]
        if acc.num_processes > 1:
            counts = acc.reduce(torch.tensor(counts, dtype=torch.float64, device=acc.device), "sum").tolist()
        step_units, real_tokens, flops, step_tokens = counts[0], int(counts[1]), counts[2], counts[3]
        if obj is not None:  # what the step's losses share (KTO: its KL estimate over every micro-batch and rank)
            reduce = (lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None
            obj.begin_step(self.model, micro, acc.autocast, reduce, step=step)  # grpo's rollouts seeded by step
        updates = self.updates_per_step  # grpo with updates_per_batch > 1: several updates on one rollout batch
        total_nll, lr, skipped = 0.0, self.scheduler.get_last_lr()[0], False
        metric_sums: dict[str, float] = {}
        # an objective's micro-batch may carry no gradient on any rank (grpo: every advantage 0): no forward, only
        # its metrics; the last micro-batch that runs communicates the gradients
        runs = [i for i, b in enumerate(micro) if bool(b.get("trains", True))]
        for _ in range(updates):
            nll_here, here = 0.0, {}  # this update's loss sum and objective metric sums
            for i, batch in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                if i not in runs:  # (only an objective's: sft always runs)
                    for k, v in obj.untrained_sums(batch).items():
                        here[k] = here.get(k, 0.0) + v
                    continue
                last = i == runs[-1]
                with self.parallel.micro_batch(sync=last):
                    calls = packed_calls()
                    if obj is not None:
                        nll, sums = obj.loss_sum(self.model, batch, acc.autocast)
                        for k, v in sums.items():
                            here[k] = here.get(k, 0.0) + v
                    elif cfg.logits != "full":  # in the model's autocast: the chunked head computes as the model's
                        with acc.autocast():
                            nll = trained_nll_sum(self.model, batch, chunked=self.chunked_head)
                    else:
                        nll = nll_sum(forward_logits(self.model, batch), batch["labels"])
                    if not self._checked_per_sample and samples_share_rows(batch["position_ids"]):
                        self._checked_per_sample = True  # the first row holding several samples: kept apart?
                        if self.per_sample_sdpa:
                            check_samples_kept_apart(type(self.parallel.module()).__name__, packed_calls() - calls)
                    # every strategy averages gradients over ranks; multiply back so the result is sum / step_units
                    self.parallel.backward(nll * acc.num_processes / max(step_units, 1.0), last)
                nll_here += float(nll.detach())
            names = sorted(here)
            if acc.num_processes > 1:  # one all-reduce per update: its loss and metric sums over every rank
                sums = torch.tensor([nll_here, *(here[k] for k in names)], dtype=torch.float64, device=acc.device)
                nll_here, *rest = acc.reduce(sums, "sum").tolist()
                here = dict(zip(names, rest))
            total_nll += nll_here
            for k, v in here.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            if not runs:  # no backward ran: the optimizer steps on zero gradients, as if every micro-batch had
                self.parallel.zero_gradients()
            # clip, step (unless the loss or gradient norm is not finite), advance the schedule, clear gradients
            grad_norm, skipped_here = self.parallel.update(
                cfg.max_grad_norm, math.isfinite(nll_here / max(step_units, 1.0))
            )
            skipped = skipped or skipped_here
        loss = total_nll / max(step_units * updates, 1.0)  # the mean over the step's updates
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "trained_tokens": int(step_tokens),
            **(obj.step_metrics(metric_sums, step_units * updates) if obj is not None else {}),
            "tokens": real_tokens,
            "flops": flops * updates,
        }

    # ------------------------------------------------------------------------ the loop
    def train(self, resume_from: str | Path | None = None) -> dict:
        """Run to total_steps (or an early stop), from step 1 or from a checkpoint. Raises TrainingStopped after
        a SIGTERM/SIGINT (checkpoint written) and BadStepsError after too many non-finite steps."""
        self.model.train()
        st = self.state = self.resume(resume_from) if resume_from else TrainState()
        self.checkpoints.check_space(find_latest(self.ckpt_root))
        every_eval, ck = self.cfg.eval.every_steps, self.cfg.checkpoint
        last_save = time.monotonic()
        t0 = time.perf_counter() - st.train_seconds
        with StopSignals() as stop:
            for step in range(st.step + 1, self.total_steps + 1):
                t = time.perf_counter()
                m = self._step(step)
                dt = time.perf_counter() - t
                st.step = step
                st.tokens_total += m["tokens"]
                st.trained_tokens_total += m["trained_tokens"]
                mfu, note = self.mfu.update(m.pop("flops"), dt)
                if note:
                    self.log(note)
                m.update(
                    step_time_s=dt,
                    tokens_per_s=m["tokens"] / dt,
                    trained_tokens_per_s=m["trained_tokens"] / dt,
                    mfu=mfu,
                    peak_mem_gb=peak_memory_gb(self.device),
                    trained_tokens_total=st.trained_tokens_total,
                    tokens_total=st.tokens_total,
                    epoch=step * self.cfg.train.grad_accum / self.order.batches_per_epoch,
                )
                if m["skipped"]:
                    record_bad_step(self.state, self.cfg.train, self.monitor, step, m, self.ckpt_root)
                else:
                    del m["skipped"]
                    spikes = self.cfg.objective.type != "grpo"  # its loss is a surrogate around 0
                    track_loss(self.state, self.cfg.train, self.monitor, step, m["loss"], spikes)
                self.monitor.step(step, m)
                st.train_seconds = time.perf_counter() - t0
                new_best = False
                if self.evaluate is not None and every_eval and (step % every_eval == 0 or step == self.total_steps):
                    new_best = self._eval(step)
                    if should_stop_early(self.state, self.cfg.eval):
                        st.stopped_early = True
                due = (
                    step == self.total_steps
                    or st.stopped_early
                    or stop.requested
                    or (ck.every_steps and step % ck.every_steps == 0)
                    or (ck.every_minutes and time.monotonic() - last_save >= 60 * ck.every_minutes)
                    or (new_best and self.cfg.eval.load_best_at_end)
                )
                if due:
                    saved = self.save_checkpoint()
                    last_save = time.monotonic()
                    if stop.requested:
                        raise TrainingStopped(stop.requested, step, saved, find_latest(self.ckpt_root))
                if st.stopped_early:
                    self.monitor.event(
                        f"early stopping at step {step}: {self.cfg.eval.metric} did not improve by "
                        f"{self.cfg.eval.early_stopping_min_delta:g} in "
                        f"{self.cfg.eval.early_stopping_patience} evaluations (best "
                        f"{st.best_metric:.4g} at step {st.best_step})"
                    )
                    break
        wall = time.perf_counter() - t0
        final_eval = st.last_eval if st.last_eval.get("step") == st.step else {}
        if self.evaluate is not None and not final_eval:
            self._eval(st.step)
            final_eval = st.last_eval
        if self.cfg.eval.load_best_at_end and st.best_step is not None and st.best_step != st.step:
            self.checkpoints.load_best(st)
        latest = find_latest(self.ckpt_root)
        self.summary = {
            "steps": st.step,
            "wall_s": wall,
            "tokens": st.tokens_total,
            "trained_tokens": st.trained_tokens_total,
            "tokens_per_s": st.tokens_total / max(wall, 1e-9),
            "first_loss": st.first_loss,
            "last_loss": st.last_loss,
            "bad_steps": st.bad_steps,
            "failed_checkpoint_saves": st.failed_saves,
            "lost_metric_records": self.monitor.lost_records,
            "last_checkpoint": latest and str(latest),
            "skipped_rows": (self.data.report.get("invalid") or {}).get("skipped", 0),
            "stopped_early": st.stopped_early,
            "best_step": st.best_step,
            "world_size": self.accelerator.num_processes,
            "wrapper": self.wrapper,
            "params_held_per_rank": self.local_fraction,
            **{k: v for k, v in final_eval.items() if k != "step"},
        }
        return self.summary

    def _eval(self, step: int) -> bool:
        """Evaluate and log; True when this is a new best (train/step_records.py keeps the bookkeeping)."""
        result = self.evaluate(self.parallel.module(), self.monitor.status)
        self.monitor.write({"type": "eval", "step": step, **result})
        self.monitor.event(f"eval @ step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return record_eval(self.state, self.cfg.eval, step, result)

    # ------------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume_key(self) -> dict:
        dump = self.cfg.model_dump(mode="json")
        return {
            "model": dump["model"],
            "adapter": dump["adapter"],
            "data_fingerprint": self.data.report.get("fingerprint"),
            "data_order": self.order.layout(),
            "train.group_by_length": self.cfg.train.group_by_length,
            "world_size": self.accelerator.num_processes,
            "train.seed": self.cfg.train.seed,
            "checkpoint_layout": self.parallel.checkpoint_layout(),
            "precision": self.precision,
            "config": flat_config(dump),
        }

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step; None when it could not be written (said whatever log.progress is, counted,
        and survived: the previous checkpoint stays; train/run_checkpoints.py)."""
        return self.checkpoints.save(self.state, self.resume_key())

    def resume(self, path: str | Path) -> TrainState:
        return self.checkpoints.resume(path, self.resume_key(), self.total_steps, self.log)

    # ------------------------------------------------------------------------ results
    def save_final(self) -> Path:
        """Write `<run>/final`: adapter or full weights (safetensors) + tokenizer + tuneforge.json, atomically. Raises
        FinalWriteError, naming the last good checkpoint, when it cannot be written."""
        self.accelerator.wait_for_everyone()
        # sharded strategies gather every weight onto rank 0 first (a collective: all ranks take part)
        state_dict = self.parallel.full_state_dict()
        if not self.is_main:
            return self.run_dir / "final"
        stops = self.data.report.get("stop_token_ids") or [self.data.tokenizer.eos_token_id]
        info = {
            "tuneforge_version": __version__,
            "adapter": self.cfg.adapter.type,
            "objective": self.cfg.objective.type,
            "steps": self.state.step,
            "best_step": self.state.best_step,
            "precision": self.precision,
            **self.params_report,
        }
        try:
            model = self.parallel.module()
            if self.objective is not None:  # a reward model: the merged sequence-classification model
                model = self.objective.final_model(model)
            return write_final(self.run_dir, model, state_dict, self.data.tokenizer, stops, info)
        except Exception as e:  # noqa: BLE001 - any writer's error (disk full, read-only, ...): say what is kept
            latest = find_latest(self.ckpt_root)
            raise FinalWriteError(final_failed_message(self.run_dir, e, latest, self.state.step), latest) from e

    def cleanup(self) -> None:
        self.monitor.close()

    def finish(self) -> None:
        """After a successful run: every rank waits for rank 0 to finish writing, then the engine and the process
        group are shut down in order (a rank that simply exits can abort on threads DeepSpeed or gloo still hold)."""
        self.accelerator.wait_for_everyone()
        self.parallel.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
