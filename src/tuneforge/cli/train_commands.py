"""train (one process or a launch of several) and plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tuneforge.cli.console import EXIT_CONFIG, EXIT_FAILED, _err, _load
from tuneforge.cli.eval_commands import _write_report_quietly
from tuneforge.config.load import write_resolved_config
from tuneforge.config.packages import require_packages


# ---------------------------------------------------------------------------- train
def _task_eval(model, data, cfg) -> dict:
    from tuneforge.eval.generation import generate
    from tuneforge.eval.runner import held_out_chats
    from tuneforge.eval.tasks import task_metrics

    prompts, refs = held_out_chats(data.eval, cfg.eval.generate_rows)
    if not prompts:
        return {}
    preds = generate(model, data.tokenizer, prompts, cfg.eval.max_new_tokens, data.report.get("stop_token_ids"),
                     batch_size=cfg.eval.batch_size, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p)
    return task_metrics(preds, refs)


def _general_text(model, data, cfg) -> dict:
    """Perplexity on eval.general_text (the forgetting check), or nothing when the key is unset."""
    if not cfg.eval.general_text:
        return {}
    from tuneforge.eval.general_text import general_text_perplexity, general_text_windows

    windows = general_text_windows(cfg.eval.general_text, data.tokenizer, cfg.eval.general_text_tokens,
                                   cfg.data.max_seq_len)
    return general_text_perplexity(model, windows, cfg.eval.batch_size, data.tokenizer.pad_token_id)


def _print_comparison(before: dict, after: dict) -> None:
    keys = [k for k in after if k in before and isinstance(after[k], float)]
    if not keys:
        return
    print(f"\n{'metric':<24}{'before':>12}{'after':>12}{'delta':>12}")
    for k in keys:
        print(f"{k:<24}{before[k]:>12.4f}{after[k]:>12.4f}{after[k] - before[k]:>+12.4f}")


class RunComplete(Exception):
    """`train` into a run that already finished: there is nothing to train. Exit 0 when the config is the one it
    was trained with (the command is done: running it again, as a script or a scheduler re-queuing the job would, is
    a no-op, not a failure), 2 (a config error) when the config changed, since those changes would not apply."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _config_changes(run_dir: Path, cfg) -> list[str]:
    """Settings of `cfg` that differ from the run's config.yaml (log.* ignored: it changes no result)."""
    import yaml

    from tuneforge.train.checkpoint import flat_config

    try:
        old = flat_config(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return []
    new = flat_config(cfg.model_dump(mode="json"))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith("log.") and k != "output.overwrite"]


def _run_complete(run_dir: Path, cfg) -> RunComplete:
    final = run_dir / "final"
    try:
        steps = f"{json.loads((final / 'tuneforge.json').read_text(encoding='utf-8'))['steps']} steps"
    except (OSError, ValueError, KeyError):
        steps = "its steps"
    again = (f"To train again: choose a new output.dir; or start over here with output.overwrite=true; or, to "
             f"continue it from its last checkpoint (e.g. with a larger train.max_steps), delete {final} (the "
             "checkpoints stay) and run the command again")
    changes = _config_changes(run_dir, cfg) if cfg is not None else []
    if changes:
        return RunComplete(f"{final} already exists: the run in {run_dir} is complete ({steps}), trained with another "
                           f"config ({'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}), so this command "
                           f"would train nothing. {again}", EXIT_CONFIG)
    return RunComplete(f"{run_dir} is already complete: {steps} trained, the weights are in {final} (summary in "
                       f"{run_dir / 'run_summary.json'}). Nothing to train. {again}", 0)


def _resume_point(resume: str, run_dir: Path, overwrite: bool, clear: bool = True, cfg=None) -> Path | None:
    """Which checkpoint `train` continues from (None = a fresh start), per --resume and what the run dir holds.
    A fresh start over an earlier run's results needs output.overwrite=true, and then clears them. A finished run
    (final/ written) resumed with `auto` raises RunComplete."""
    from tuneforge.train.checkpoint import CheckpointError, clean_partial, find_latest, read_manifest

    ckpts = run_dir / "checkpoints"
    if clear:
        clean_partial(ckpts)
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        read_manifest(path)
        return path
    latest = find_latest(ckpts)
    finished = (run_dir / "final").exists()
    if resume == "auto" and latest is not None and not finished:
        return latest
    if finished or latest is not None:
        what = f"{run_dir}/final already exists" if finished else f"{run_dir} has checkpoints up to {latest.name}"
        if not overwrite and finished and resume == "auto":
            raise _run_complete(run_dir, cfg)
        if not overwrite:
            hint = ("choose another output.dir or pass output.overwrite=true to train again from scratch" if finished
                    else "run without --resume never to continue it, or pass output.overwrite=true to start over")
            raise CheckpointError(f"{what}; {hint}")
        if not clear:
            return None
        import shutil

        shutil.rmtree(ckpts, ignore_errors=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def _start_eval(metrics_path: Path) -> dict:
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


def _launch_processes(args, cfg, run_dir: Path) -> int:
    """`train --nproc N`: resolve the resume point and prepare the data here, once, then start N ranks."""
    from tuneforge.data.prepare import prepare
    from tuneforge.train.launch import LaunchSpec, launch

    spec = LaunchSpec(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    resume_from = None
    if args.node_rank == 0:
        try:
            resume_from = _resume_point(args.resume, run_dir, cfg.output.overwrite, cfg=cfg)
        except RunComplete as done:
            return _say_complete(done)
        write_resolved_config(cfg, run_dir)
        prepare(cfg, run_dir)  # the ranks find it cached (other nodes' ranks wait for it on the shared file system)
    elif args.resume not in ("auto", "never"):
        resume_from = Path(args.resume)
    cli_args = ["train", args.config, *args.overrides, "--resume", args.resume]
    print(f"launching {spec.nproc} processes on node {spec.node_rank} of {spec.nnodes} (world size {spec.world_size})")
    rc = launch(spec, cli_args, str(resume_from) if resume_from else None, cfg.train.threads)
    if rc != 0:
        _err(f"training on {spec.world_size} processes failed (exit code {rc}); the launcher's report above names "
             "the failed rank and its error. Run the same command again to resume from the latest checkpoint.")
        return EXIT_FAILED
    return 0


def _say_complete(done: RunComplete) -> int:
    if done.exit_code:
        _err(str(done))
    else:
        print(str(done))
    return done.exit_code


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_train(args) -> int:
    import os

    from tuneforge.data.collate import PaddedCollator
    from tuneforge.data.prepare import prepare, wait_for_prepared
    from tuneforge.eval.generation import generate
    from tuneforge.eval.perplexity import evaluate_loss
    from tuneforge.train.alerts import end_of_run_warnings
    from tuneforge.train.final import FinalWriteError
    from tuneforge.train.launch import RESUME_ENV, adopt_slurm_env, rank, under_launcher
    from tuneforge.train.loop import Trainer

    cfg = _load(args)
    require_packages(cfg)  # before anything is loaded or written
    run_dir = Path(cfg.output.dir)
    adopt_slurm_env()
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher():
        return _launch_processes(args, cfg, run_dir)
    main_rank = rank() == 0
    say = print if main_rank else (lambda *a, **k: None)
    if RESUME_ENV in os.environ:  # started by our own launcher, which resolved it
        resume_from = Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    else:  # every rank reaches the same answer; only rank 0 clears an overwritten run
        try:
            resume_from = _resume_point(args.resume, run_dir, cfg.output.overwrite, clear=main_rank, cfg=cfg)
        except RunComplete as done:
            return _say_complete(done) if main_rank else done.exit_code
    if main_rank:
        write_resolved_config(cfg, run_dir)
        from tuneforge.progress import stage_status

        with stage_status("preparing data", cfg.log.progress) as log:
            data = prepare(cfg, run_dir, log=log)
    else:
        data = wait_for_prepared(cfg, run_dir, timeout_s=60 * cfg.dist.timeout_minutes)

    # before loading the model: will it fit, and does train.gradient_checkpointing=auto turn checkpointing on?
    from tuneforge.train.planner import available_bytes, check_fits

    device = "cuda" if torch_cuda_available() else "cpu"
    plan = None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # sharded strategies divide by it
        plan = _memory_plan(cfg, run_dir, device, available_bytes(device), gpus=world)
    except Exception as e:  # noqa: BLE001 - the plan is advice; a model it cannot build is loaded below anyway
        if main_rank:
            print(f"memory plan skipped ({type(e).__name__}: {e})", file=sys.stderr)
    if cfg.train.gradient_checkpointing == "auto":
        cfg.train.gradient_checkpointing = plan.checkpointing if plan else False
        say(plan.notes[0] if plan else "gradient checkpointing off (auto: no memory plan)")
    warning = check_fits(plan) if plan is not None and main_rank else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    collate = PaddedCollator(data.tokenizer.pad_token_id)
    trainer = Trainer(cfg, run_dir, data, None, log=say).setup()
    device = trainer.accelerator.device

    def evaluate(model) -> dict:
        done = [0]

        def tick(rows: int) -> None:  # eval progress in the training bar (one live display at a time)
            done[0] += rows
            trainer.monitor.status(f"evaluating {done[0]}/{len(data.eval)} rows")

        return evaluate_loss(model, data.eval, collate, cfg.eval.batch_size, device, on_batch=tick)

    trainer.evaluate = evaluate if data.eval is not None else None
    try:
        model = trainer.parallel.module()
        # a sharded model (FSDP2, ZeRO-3) runs a forward pass on every rank together, generation included
        gen_here = main_rank or trainer.parallel.sharded
        before: dict = _start_eval(trainer.monitor.path) if resume_from else {}
        if data.eval is not None and cfg.eval.at_start and not resume_from:
            before = {**evaluate(model), **_general_text(model, data, cfg)}
            if cfg.eval.generate_rows and gen_here:
                with trainer.parallel.generation():
                    before.update(_task_eval(model, data, cfg))
            trainer.monitor.write({"type": "eval", "step": 0, **before})
            say("before training: " + "  ".join(f"{k}={v:.4g}" for k, v in before.items()))
        summary = trainer.train(resume_from)
        after = {k: v for k, v in summary.items() if k.startswith("eval_")}
        if data.eval is not None and cfg.eval.at_start:
            after.update(_general_text(model, data, cfg))
        if data.eval is not None and cfg.eval.generate_rows and gen_here:
            with trainer.parallel.generation():
                after.update(_task_eval(model, data, cfg))
            trainer.monitor.write({"type": "eval", "step": trainer.total_steps, **after})
        samples_source = data.eval if data.eval is not None else data.train
        shown = None
        if cfg.eval.show_samples and gen_here:
            from tuneforge.eval.runner import held_out_chats

            prompts, refs = held_out_chats(samples_source, cfg.eval.show_samples)
            with trainer.parallel.generation():
                shown = prompts, refs, generate(model, data.tokenizer, prompts, cfg.eval.max_new_tokens,
                                                data.report.get("stop_token_ids"))
        final, final_error = None, None
        try:
            final = trainer.save_final()
        except FinalWriteError as e:  # the run is not lost: it says where the last good checkpoint is
            final_error = e
    finally:
        trainer.cleanup()
    if not main_rank:
        trainer.finish()
        return 0

    print(f"\ntrained {summary['steps']} steps in {summary['wall_s']:.1f}s "
          f"({summary['tokens_per_s']:,.0f} tokens/s); loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    _print_comparison(before, after)
    from tuneforge.eval.general_text import forgetting_line

    forgetting = forgetting_line(before, after, cfg.eval.general_text)
    if forgetting:
        print(forgetting)
    samples = []
    if shown is not None:
        prompts, refs, preds = shown
        print("\nsample generations:")
        for p, r, g in zip(prompts, refs, preds):
            print(f"  prompt:    {p[-1]['content']!r}\n  expected:  {r!r}\n  generated: {g!r}")
            samples.append({"prompt": p[-1]["content"], "reference": r, "generated": g})
    for line in end_of_run_warnings(summary, run_dir):
        print(line, file=sys.stderr)
    try:
        (run_dir / "run_summary.json").write_text(json.dumps({"before": before, "after": after, **summary,
                                                              "samples": samples}, indent=2))
    except OSError as e:
        print(f"warning: {run_dir / 'run_summary.json'} could not be written ({e})", file=sys.stderr)
    if final_error is not None:
        import shlex

        trainer.finish()
        _err(f"{final_error}\n  the command: tuneforge train {shlex.join([args.config, *args.overrides])}")
        return EXIT_FAILED
    _write_report_quietly(run_dir)
    trainer.finish()
    print(f"\nsaved {final} (try: tuneforge generate {run_dir} --prompt \"...\")")
    return 0


# ---------------------------------------------------------------------------- plan
def _memory_plan(cfg, run_dir: Path | None, device: str, device_bytes: float | None, gpus: int = 1):
    from tuneforge.train.planner import plan_memory

    fraction = 1.0
    report = (run_dir / "data" / "data_report.json") if run_dir else None
    if report is not None and report.exists() and not cfg.data.packing:
        fraction = json.loads(report.read_text()).get("train", {}).get("trained_fraction", 1.0)
    import torch

    precision = None
    if device == "cuda" and cfg.train.precision == "auto" and not torch.cuda.is_available():
        precision = "bf16"  # planning for a GPU from a machine without one: assume a bf16-capable GPU
    plan = plan_memory(cfg, device, precision, gpus=gpus, device_bytes=device_bytes, trained_fraction=fraction)
    if fraction == 1.0:
        plan.notes.append("LM head sized for every position trained (prepare the data first for the real fraction)")
    return plan


def cmd_plan(args) -> int:
    from tuneforge.train.planner import available_bytes, parse_size

    cfg = _load(args)
    device = "cuda" if (args.gpus or args.gpu_mem) else "cpu"
    try:
        device_bytes = parse_size(args.gpu_mem) if args.gpu_mem else available_bytes(device)
    except ValueError as e:
        _err(f"--gpu-mem: {e}")
        return EXIT_CONFIG
    plan = _memory_plan(cfg, Path(cfg.output.dir), device, device_bytes, args.gpus or 1)
    print(plan.table())
    return EXIT_FAILED if plan.fits is False else 0
