"""train (one process or a launch of several) and plan."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.cli.console import EXIT_CONFIG, EXIT_FAILED, _err, _load
from tuneforge.config.load import write_resolved_config
from tuneforge.config.packages import require_packages


# ---------------------------------------------------------------------------- train
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
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith("log.") and k != "output.overwrite"
    ]


def _run_complete(run_dir: Path, cfg) -> RunComplete:
    final = run_dir / "final"
    try:
        steps = f"{json.loads((final / 'tuneforge.json').read_text(encoding='utf-8'))['steps']} steps"
    except (OSError, ValueError, KeyError):
        steps = "its steps"
    again = (
        f"To train again: choose a new output.dir; or start over here with output.overwrite=true; or, to "
        f"continue it from its last checkpoint (e.g. with a larger train.max_steps), delete {final} (the "
        "checkpoints stay) and run the command again"
    )
    changes = _config_changes(run_dir, cfg) if cfg is not None else []
    if changes:
        return RunComplete(
            f"{final} already exists: the run in {run_dir} is complete ({steps}), trained with another "
            f"config ({'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}), so this command "
            f"would train nothing. {again}",
            EXIT_CONFIG,
        )
    return RunComplete(
        f"{run_dir} is already complete: {steps} trained, the weights are in {final} (summary in "
        f"{run_dir / 'run_summary.json'}). Nothing to train. {again}",
        0,
    )


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
            hint = (
                "choose another output.dir or pass output.overwrite=true to train again from scratch"
                if finished
                else "run without --resume never to continue it, or pass output.overwrite=true to start over"
            )
            raise CheckpointError(f"{what}; {hint}")
        if not clear:
            return None
        import shutil

        shutil.rmtree(ckpts, ignore_errors=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


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
        _err(
            f"training on {spec.world_size} processes failed (exit code {rc}); the launcher's report above names "
            "the failed rank and its error. Run the same command again to resume from the latest checkpoint."
        )
        return EXIT_FAILED
    return 0


def _say_complete(done: RunComplete) -> int:
    if done.exit_code:
        _err(str(done))
    else:
        print(str(done))
    return done.exit_code


def cmd_train(args) -> int:
    import os
    import shlex

    from tuneforge.train.launch import RESUME_ENV, adopt_slurm_env, rank, under_launcher
    from tuneforge.train.recipe import Recipe

    cfg = _load(args)
    require_packages(cfg)  # before anything is loaded or written
    run_dir = Path(cfg.output.dir)
    adopt_slurm_env()
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher():
        return _launch_processes(args, cfg, run_dir)
    main_rank = rank() == 0
    if RESUME_ENV in os.environ:  # started by our own launcher, which resolved it
        resume_from = Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    else:  # every rank reaches the same answer; only rank 0 clears an overwritten run
        try:
            resume_from = _resume_point(args.resume, run_dir, cfg.output.overwrite, clear=main_rank, cfg=cfg)
        except RunComplete as done:
            return _say_complete(done) if main_rank else done.exit_code
    command = f"tuneforge train {shlex.join([args.config, *args.overrides])}"
    return Recipe(cfg, run_dir, resume_from, is_main=main_rank, command=command).run()


# ---------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from tuneforge.train.planner import available_bytes, parse_size, plan_for_run

    cfg = _load(args)
    device = "cuda" if (args.gpus or args.gpu_mem) else "cpu"
    try:
        device_bytes = parse_size(args.gpu_mem) if args.gpu_mem else available_bytes(device)
    except ValueError as e:
        _err(f"--gpu-mem: {e}")
        return EXIT_CONFIG
    plan = plan_for_run(cfg, Path(cfg.output.dir), device, device_bytes, args.gpus or 1)
    print(plan.table())
    return EXIT_FAILED if plan.fits is False else 0
