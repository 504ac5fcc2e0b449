"""STAGE: the training loop. One loop for LoRA, DoRA and full fine-tuning, on `accelerate`.

Read it top to bottom: `setup()` builds the parts (device, model, adapter, optimizer, schedule, data
order), `train()` runs optimizer steps, `save_final()` writes `<run>/final` in Hugging Face format.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from tuneforge import __version__
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import PackedCollator, PaddedCollator, rows_at
from tuneforge.data.prepare import PreparedData
from tuneforge.model.adapters import apply_adapter, describe, trainable_report
from tuneforge.model.load import DTYPES, choose_attention, choose_precision, load_model
from tuneforge.train.batches import BatchOrder
from tuneforge.train.loss import forward_logits, nll_sum, trained_tokens
from tuneforge.train.monitor import Monitor
from tuneforge.train.optim import build_optimizer, build_scheduler

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, data: PreparedData,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.data, self.evaluate, self.log = cfg, Path(run_dir), data, evaluate, log

    # ------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        cfg = self.cfg
        # ---- device, precision, threads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = choose_precision(cfg.train.precision, device)
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision=MIXED_PRECISION[self.precision])
        if device == "cpu":
            torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // self.accelerator.num_processes))
        self.is_main = self.accelerator.is_main_process

        # ---- model and adapter
        attention = choose_attention(cfg.model.attn_implementation, device)
        frozen_low_precision = cfg.adapter.type != "full" and self.precision != "fp32"
        dtype = DTYPES[self.precision] if frozen_low_precision else torch.float32
        model = load_model(cfg.model, self.data.tokenizer, dtype, attention, seed=cfg.train.seed)
        if cfg.model.init is not None and cfg.adapter.type != "full":
            # an adapter needs its base on disk: save the freshly initialised model beside the run
            base_dir = (self.run_dir / "base").resolve()
            model.save_pretrained(str(base_dir))
            self.data.tokenizer.save_pretrained(str(base_dir))
            model.name_or_path = str(base_dir)
        torch.manual_seed(cfg.train.seed)
        model = apply_adapter(model, cfg.adapter, cfg.train.gradient_checkpointing)
        self.params_report = trainable_report(model)
        self.log(f"model: {cfg.model.name_or_path or cfg.model.init.architecture + ' (new)'} on {device}, "
                 f"precision {self.precision}, attention {attention}; {describe(self.params_report)}")

        # ---- data order and length of the run
        self.order = BatchOrder(len(self.data.train), cfg.train.micro_batch_size, cfg.train.seed,
                                self.accelerator.num_processes, self.accelerator.process_index)
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.order.batches_per_epoch / cfg.train.grad_accum))
        packed = "position_ids" in self.data.train.column_names
        self.collate = (PackedCollator if packed else PaddedCollator)(self.data.tokenizer.pad_token_id)

        # ---- optimizer and schedule
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.monitor = Monitor(self.run_dir, self.total_steps, cfg.log.every_steps, cfg.log.progress, self.is_main)
        return self

    # ------------------------------------------------------------------------ one optimizer step
    def _step(self, step: int) -> dict:
        acc, cfg = self.accelerator, self.cfg.train
        first = (step - 1) * cfg.grad_accum
        micro = [self.collate(rows_at(self.data.train, self.order.micro_batch(first + i))) for i in range(cfg.grad_accum)]
        # token-normalised over the whole step: every micro-batch and every rank
        step_tokens = torch.tensor(float(sum(trained_tokens(b["labels"]) for b in micro)), device=acc.device)
        step_tokens = float(acc.reduce(step_tokens, "sum")) if acc.num_processes > 1 else float(step_tokens)
        total_nll = 0.0
        real_tokens = sum(int(b.pop("num_tokens")) for b in micro)
        for i, batch in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = i == len(micro) - 1 or acc.num_processes == 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                logits = forward_logits(self.model, batch)
                nll = nll_sum(logits, batch["labels"])
                # DDP averages gradients over ranks; multiply back so the result is sum / step_tokens
                acc.backward(nll * acc.num_processes / max(step_tokens, 1.0))
            total_nll += float(nll.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(acc.clip_grad_norm_(params, max_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:
            total_nll = float(acc.reduce(torch.tensor(total_nll, device=acc.device), "sum"))
        return {"loss": total_nll / max(step_tokens, 1.0), "lr": lr, "grad_norm": grad_norm,
                "trained_tokens": int(step_tokens), "tokens": real_tokens * acc.num_processes}

    # ------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.model.train()
        history: list[dict] = []
        seen_tokens = trained = 0
        t0 = time.perf_counter()
        every = self.cfg.eval.every_steps
        for step in range(1, self.total_steps + 1):
            t = time.perf_counter()
            m = self._step(step)
            dt = time.perf_counter() - t
            seen_tokens += m["tokens"]
            trained += m["trained_tokens"]
            m.update(step_time_s=dt, tokens_per_s=m["tokens"] / dt, trained_tokens_total=trained,
                     tokens_total=seen_tokens, epoch=step * self.cfg.train.grad_accum / self.order.batches_per_epoch)
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {step}: loss is {m['loss']}; lower train.lr or check the data")
            self.monitor.step(step, m)
            history.append({"step": step, "loss": m["loss"]})
            if self.evaluate is not None and every and step % every == 0 and step != self.total_steps:
                self._eval(step)
        wall = time.perf_counter() - t0
        final_eval = self._eval(self.total_steps) if self.evaluate is not None else {}
        self.summary = {"steps": self.total_steps, "wall_s": wall, "tokens": seen_tokens, "trained_tokens": trained,
                        "tokens_per_s": seen_tokens / max(wall, 1e-9), "first_loss": history[0]["loss"],
                        "last_loss": history[-1]["loss"], **final_eval}
        return self.summary

    def _eval(self, step: int) -> dict:
        result = self.evaluate(self.accelerator.unwrap_model(self.model))
        self.monitor.write({"type": "eval", "step": step, **result})
        self.monitor.event(f"eval @ step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result

    # ------------------------------------------------------------------------ results
    def save_final(self) -> Path:
        """Write `<run>/final`: adapter or full weights (safetensors) + tokenizer + tuneforge.json, atomically."""
        self.accelerator.wait_for_everyone()
        final = self.run_dir / "final"
        if not self.is_main:
            return final
        tmp = self.run_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.accelerator.unwrap_model(self.model)
        stops = self.data.report.get("stop_token_ids") or [self.data.tokenizer.eos_token_id]
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.eos_token_id = stops
            gen.pad_token_id = self.data.tokenizer.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        self.data.tokenizer.save_pretrained(str(tmp))
        info = {"tuneforge_version": __version__, "adapter": self.cfg.adapter.type, "stop_token_ids": stops,
                "steps": self.total_steps, "precision": self.precision, **self.params_report}
        (tmp / "tuneforge.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def cleanup(self) -> None:
        self.monitor.close()
