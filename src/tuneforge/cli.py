"""`tuneforge` command line: the only module that imports every stage.

  tuneforge train CONFIG.yaml [key.path=value ...]      prepare data (if needed), train, evaluate, save final/
  tuneforge prepare CONFIG.yaml [key.path=value ...]    the data stage only
  tuneforge validate CONFIG.yaml [key.path=value ...]   check a config without loading anything heavy
  tuneforge data preview CONFIG.yaml [--rows N]          prepared rows with the trained tokens marked
  tuneforge generate RUN_DIR --prompt TEXT | --file prompts.jsonl
  tuneforge reference                                    every config key with its default and meaning
  tuneforge eval RUN_DIR [--base] [--lm-eval TASKS]      held-out loss/ppl + task metrics, base vs tuned
  tuneforge report RUN_DIR                               plots + report.md + self-contained report.html
  tuneforge compare RUN_A RUN_B ...                      final metrics side by side, loss curves in one PNG
  tuneforge serve RUN_OR_MODEL_DIR [--port 8000]         OpenAI-compatible HTTP API (batched, streaming)
  tuneforge chat RUN_OR_MODEL_DIR                        terminal chat with history
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tuneforge.config.load import ConfigError, load_config, write_resolved_config

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _load(args) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(args.config, args.overrides)
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return cfg


# ---------------------------------------------------------------------------- validate / reference
def cmd_validate(args) -> int:
    cfg = _load(args)
    kind = cfg.adapter.type
    src = cfg.model.name_or_path or f"new {cfg.model.init.architecture}"
    print(f"{args.config}: valid ({kind} fine-tuning of {src}, lr {cfg.train.lr:g}, run dir {cfg.output.dir})")
    return 0


def cmd_reference(args) -> int:
    from pydantic import BaseModel

    from tuneforge.config.schema import RunConfig

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is not None:
                print(f"\n{prefix}{name}:  {field.description or ''}")
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            print(f"  {prefix}{name} = {default}\n      {field.description or ''}")

    walk(RunConfig, "")
    return 0


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from tuneforge.data.prepare import prepare

    cfg = _load(args)
    run_dir = Path(cfg.output.dir)
    write_resolved_config(cfg, run_dir)
    data = prepare(cfg, run_dir, force=args.force)
    if data.reused:
        from tuneforge.data.prepare import summary

        print(summary(data.report))
    print(f"prepared data: {run_dir / 'data'} (load with datasets.load_from_disk('{run_dir / 'data' / 'train'}'))")
    return 0


def cmd_data_preview(args) -> int:
    from tuneforge.data.prepare import prepare
    from tuneforge.data.preview import render_row

    cfg = _load(args)
    run_dir = Path(cfg.output.dir)
    write_resolved_config(cfg, run_dir)
    data = prepare(cfg, run_dir, log=lambda s: print(s, file=sys.stderr))
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    legend = "trained tokens in green" if color else "trained tokens between [[ and ]]"
    print(f"{min(args.rows, len(data.train))} of {len(data.train)} training rows ({legend}):")
    rows = data.train.select(range(min(args.rows, len(data.train))))
    for k, row in enumerate(rows):
        trained = sum(1 for x in row["labels"][1:] if x != -100)
        print(f"\n--- row {k}: {len(row['input_ids'])} tokens, {trained} trained ---")
        print(render_row(data.tokenizer, row["input_ids"], row["labels"], color))
    return 0


# ---------------------------------------------------------------------------- train
def _held_out_chats(dataset, n: int) -> tuple[list[list[dict]], list[str]]:
    prompts, refs = [], []
    for row in dataset.select_columns(["messages"]):
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        prompts.append(msgs[:last])
        refs.append(msgs[last]["content"])
        if len(prompts) == n:
            break
    return prompts, refs


def _task_eval(model, data, cfg) -> dict:
    from tuneforge.eval.generation import generate
    from tuneforge.eval.tasks import task_metrics

    prompts, refs = _held_out_chats(data.eval, cfg.eval.generate_rows)
    if not prompts:
        return {}
    preds = generate(model, data.tokenizer, prompts, cfg.eval.max_new_tokens, data.report.get("stop_token_ids"),
                     batch_size=cfg.eval.batch_size, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p)
    return task_metrics(preds, refs)


def _print_comparison(before: dict, after: dict) -> None:
    keys = [k for k in after if k in before and isinstance(after[k], float)]
    if not keys:
        return
    print(f"\n{'metric':<24}{'before':>12}{'after':>12}{'delta':>12}")
    for k in keys:
        print(f"{k:<24}{before[k]:>12.4f}{after[k]:>12.4f}{after[k] - before[k]:>+12.4f}")


def _resume_point(resume: str, run_dir: Path, overwrite: bool, clear: bool = True) -> Path | None:
    """Which checkpoint `train` continues from (None = a fresh start), per --resume and what the run dir holds.
    A fresh start over an earlier run's results needs output.overwrite=true, and then clears them."""
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
        resume_from = _resume_point(args.resume, run_dir, cfg.output.overwrite)
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


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_train(args) -> int:
    import os

    from tuneforge.data.collate import PaddedCollator
    from tuneforge.data.prepare import prepare, wait_for_prepared
    from tuneforge.eval.generation import generate
    from tuneforge.eval.perplexity import evaluate_loss
    from tuneforge.train.launch import RESUME_ENV, adopt_slurm_env, rank, under_launcher
    from tuneforge.train.loop import Trainer

    cfg = _load(args)
    run_dir = Path(cfg.output.dir)
    adopt_slurm_env()
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher():
        return _launch_processes(args, cfg, run_dir)
    main_rank = rank() == 0
    say = print if main_rank else (lambda *a, **k: None)
    if RESUME_ENV in os.environ:  # started by our own launcher, which resolved it
        resume_from = Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    else:  # every rank reaches the same answer; only rank 0 clears an overwritten run
        resume_from = _resume_point(args.resume, run_dir, cfg.output.overwrite, clear=main_rank)
    if main_rank:
        write_resolved_config(cfg, run_dir)
        from tuneforge.train.monitor import stage_status

        with stage_status("preparing data", cfg.log.progress) as log:
            data = prepare(cfg, run_dir, log=log)
    else:
        data = wait_for_prepared(cfg, run_dir, timeout_s=60 * cfg.dist.timeout_minutes)

    if main_rank:  # before loading the model: will it fit?
        from tuneforge.train.planner import available_bytes, check_fits

        device = "cuda" if torch_cuda_available() else "cpu"
        try:
            warning = check_fits(_memory_plan(cfg, run_dir, device, available_bytes(device)))
        except Exception as e:  # noqa: BLE001 - the plan is advice; a model it cannot build is loaded below anyway
            warning = None
            print(f"memory plan skipped ({type(e).__name__}: {e})", file=sys.stderr)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)

    collate = PaddedCollator(data.tokenizer.pad_token_id)
    trainer = Trainer(cfg, run_dir, data, None, log=say).setup()
    device = trainer.accelerator.device

    def evaluate(model) -> dict:
        return evaluate_loss(model, data.eval, collate, cfg.eval.batch_size, device)

    trainer.evaluate = evaluate if data.eval is not None else None
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        before: dict = _start_eval(trainer.monitor.path) if resume_from else {}
        if data.eval is not None and cfg.eval.at_start and not resume_from:
            before = evaluate(model)
            if cfg.eval.generate_rows and main_rank:
                before.update(_task_eval(model, data, cfg))
            trainer.monitor.write({"type": "eval", "step": 0, **before})
            say("before training: " + "  ".join(f"{k}={v:.4g}" for k, v in before.items()))
        summary = trainer.train(resume_from)
        after = {k: v for k, v in summary.items() if k.startswith("eval_")}
        if data.eval is not None and cfg.eval.generate_rows and main_rank:
            after.update(_task_eval(model, data, cfg))
            trainer.monitor.write({"type": "eval", "step": trainer.total_steps, **after})
        final = trainer.save_final()
    finally:
        trainer.cleanup()
    if not main_rank:
        return 0

    print(f"\ntrained {summary['steps']} steps in {summary['wall_s']:.1f}s "
          f"({summary['tokens_per_s']:,.0f} tokens/s); loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    _print_comparison(before, after)
    samples = []
    if cfg.eval.show_samples:
        source = data.eval if data.eval is not None else data.train
        prompts, refs = _held_out_chats(source, cfg.eval.show_samples)
        preds = generate(model, data.tokenizer, prompts, cfg.eval.max_new_tokens, data.report.get("stop_token_ids"))
        print("\nsample generations:")
        for p, r, g in zip(prompts, refs, preds):
            print(f"  prompt:    {p[-1]['content']!r}\n  expected:  {r!r}\n  generated: {g!r}")
            samples.append({"prompt": p[-1]["content"], "reference": r, "generated": g})
    (run_dir / "run_summary.json").write_text(json.dumps({"before": before, "after": after, **summary,
                                                          "samples": samples}, indent=2))
    _write_report_quietly(run_dir)
    print(f"\nsaved {final} (try: tuneforge generate {run_dir} --prompt \"...\")")
    return 0


# ---------------------------------------------------------------------------- eval / report / compare
def _write_report_quietly(run_dir: Path) -> None:
    """The run report after training; a report problem is a warning, never a failed run."""
    from tuneforge.eval.report import write_report

    try:
        md, page = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the weights are saved; the report can be rebuilt with `tuneforge report`
        print(f"warning: the run report was not written ({type(e).__name__}: {e}); "
              f"retry with: tuneforge report {run_dir}", file=sys.stderr)
        return
    print(f"report: {md} and {page.name} (plots in {run_dir / 'plots'})")


def cmd_eval(args) -> int:
    import torch

    from tuneforge.data.prepare import load_prepared
    from tuneforge.eval.harness import LmEvalMissing, require_lm_eval, run_lm_eval
    from tuneforge.eval.runner import (EvalError, ModelEval, base_model, comparison_table, evaluate_model,
                                       write_eval_json)
    from tuneforge.model.load import load_trained

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        _err(f"{run_dir}: no config.yaml here; give a run directory written by `tuneforge train`")
        return EXIT_CONFIG
    if not (run_dir / "data" / "eval").exists():
        _err(f"{run_dir}: no held-out set in {run_dir / 'data' / 'eval'}; train with data.eval_fraction > 0 "
             "or data.eval set to have one")
        return EXIT_CONFIG
    tasks = [t for t in (args.lm_eval or "").split(",") if t]
    if tasks:
        try:
            require_lm_eval()
        except LmEvalMissing as e:
            _err(str(e))
            return EXIT_CONFIG
    # trackers play no part in eval: a tracker package missing here must not block it
    cfg = load_config(run_dir / "config.yaml", ["log.report_to=[jsonl]"])
    for key in ("max_new_tokens", "temperature", "top_p", "batch_size"):
        if getattr(args, key) is not None:
            setattr(cfg.eval, key, getattr(args, key))
    progress = args.progress or cfg.log.progress
    rows = args.rows or cfg.eval.generate_rows or None
    data = load_prepared(run_dir)
    model, tok, info = load_trained(run_dir)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    stops = info.get("stop_token_ids") or data.report.get("stop_token_ids")

    def run(m, label: str) -> ModelEval:
        result = evaluate_model(m, tok, data.eval, cfg.eval, stops, rows, progress, label)
        if tasks:
            result.metrics.update(run_lm_eval(m, tok, tasks, args.lm_eval_limit, cfg.eval.batch_size))
        return result

    try:
        base = None
        if args.base:
            with base_model(model, cfg, tok) as m:
                base = run(m, "base")
        tuned = run(model, "tuned")
    except EvalError as e:
        _err(str(e))
        return EXIT_FAILED
    settings = {"rows": len(data.eval), "generated_rows": tuned.metrics.get("generated_rows", 0),
                "max_new_tokens": cfg.eval.max_new_tokens, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p}
    out = write_eval_json(run_dir, tuned, base, settings)
    print(f"held-out set: {len(data.eval)} rows ({settings['generated_rows']} generated, "
          f"max_new_tokens {cfg.eval.max_new_tokens}, temperature {cfg.eval.temperature:g})\n")
    print(comparison_table(base.metrics if base else None, tuned.metrics))
    print(f"\nwrote {out}")
    return 0


def cmd_report(args) -> int:
    from tuneforge.eval.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").exists() and not (Path(args.run_dir) / "config.yaml").exists():
        _err(f"{args.run_dir}: not a run directory (no metrics.jsonl or config.yaml)")
        return EXIT_CONFIG
    md, page = write_report(args.run_dir)
    print(f"wrote {md}, {page} and {Path(args.run_dir) / 'plots'}/*.png")
    return 0


def cmd_compare(args) -> int:
    from tuneforge.eval.compare import compare_runs

    try:
        table, png = compare_runs(args.runs, args.out)
    except FileNotFoundError as e:
        _err(str(e))
        return EXIT_CONFIG
    print(table)
    print(f"\nloss curves: {png}")
    return 0


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from tuneforge.eval.generation import generate
    from tuneforge.model.load import load_trained

    if (args.prompt is None) == (args.file is None):
        _err("give exactly one of --prompt TEXT or --file prompts.jsonl")
        return EXIT_CONFIG
    if args.prompt is not None:
        chats = [[{"role": "user", "content": args.prompt}]]
    else:
        chats = []
        for n, line in enumerate(Path(args.file).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                chats.append(row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                _err(f"{args.file}:{n}: expected a JSON object with \"prompt\" or \"messages\" ({type(e).__name__}: {e})")
                return EXIT_CONFIG
    if args.system:
        chats = [[{"role": "system", "content": args.system}, *c] for c in chats]
    model, tok, info = load_trained(args.run_dir)
    outs = generate(model, tok, chats, args.max_new_tokens, info.get("stop_token_ids"), temperature=args.temperature,
                    top_p=args.top_p)
    if args.prompt is not None:
        print(outs[0])
    else:
        for c, o in zip(chats, outs):
            print(json.dumps({"prompt": c[-1]["content"], "completion": o}, ensure_ascii=False))
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


# ---------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from tuneforge.export import ExportError, ExportParityError, export_run

    prompts = None
    if args.prompts:
        prompts = []
        for n, line in enumerate(Path(args.prompts).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["messages"] if "messages" in row else row["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                _err(f"{args.prompts}:{n}: expected a JSON object with \"prompt\" or \"messages\" ({type(e).__name__}: {e})")
                return EXIT_CONFIG
    try:
        result = export_run(args.run_dir, args.out, args.dtype, prompts, base_model=args.base,
                            max_shard_size=args.max_shard_size)
    except ExportParityError as e:
        _err(str(e))
        return EXIT_FAILED
    except ExportError as e:
        _err(str(e))
        return EXIT_CONFIG
    print(f"export ok: {result.out_dir} ({result.dtype}{', merged ' + result.adapter if result.merged else ''}); "
          f"parity report in {result.out_dir / 'parity.json'}")
    return 0


# ---------------------------------------------------------------------------- serve / chat
def cmd_serve(args) -> int:
    import os

    from tuneforge.serve import SERVE_EXTRA_HINT, missing_serve_deps

    missing = missing_serve_deps()
    if missing:
        _err(f"tuneforge serve needs {' and '.join(missing)} (not installed): {SERVE_EXTRA_HINT}")
        return EXIT_FAILED
    from tuneforge.serve.loading import load_served
    from tuneforge.serve.server import run_server

    served = load_served(args.run_dir, name=args.model_name, device=args.device)
    api_key = args.api_key or os.environ.get("TUNEFORGE_API_KEY") or None
    run_server(served, args.host, args.port, api_key, args.max_batch_size, args.batch_window_ms)
    return 0


def cmd_chat(args) -> int:
    from tuneforge.serve.chat import run_chat
    from tuneforge.serve.engine import Engine
    from tuneforge.serve.loading import load_served

    served = load_served(args.run_dir, device=args.device)
    engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length, max_batch_size=1)
    engine.start()
    try:
        return run_chat(served, engine, args.max_new_tokens, args.temperature, args.top_p, args.system)
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.max_seq_len=512")
        return sp

    tr = with_config("train", "prepare data if needed, train (resuming from the latest checkpoint), evaluate, save final/")
    tr.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                    help="auto: continue from <run>/checkpoints/latest if the run is unfinished (default); "
                    "never: start from step 0; PATH: continue from that checkpoint directory")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="processes (GPUs, or CPU processes) on this node; >1 launches torchrun (DDP)")
    tr.add_argument("--nnodes", type=int, default=1, help="nodes in the job (multi-node: run the same command on each)")
    tr.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    tr.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node)")
    tr.add_argument("--master-port", type=int, default=None, help="port on node 0 (default: a free one; 29500 multi-node)")
    tr.set_defaults(func=cmd_train)
    with_config("validate", "check a config (no model or data loaded)").set_defaults(func=cmd_validate)
    pl = with_config("plan", "estimate peak memory per device (weights, gradients, optimizer, activations, logits) "
                     "before loading anything; exit 1 when it does not fit")
    pl.add_argument("--gpus", type=int, default=None, help="plan for N GPUs (DDP: the same per device)")
    pl.add_argument("--gpu-mem", default=None, help="memory per device, e.g. 80GiB (default: what this machine has free)")
    pl.set_defaults(func=cmd_plan)
    sp = with_config("prepare", "run only the data stage into RUN_DIR/data")
    sp.add_argument("--force", action="store_true", help="prepare again even if the cache is up to date")
    sp.set_defaults(func=cmd_prepare)

    data_cmd = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    pv = data_cmd.add_parser("preview", help="show prepared rows with the trained tokens marked")
    pv.add_argument("config", help="YAML config file")
    pv.add_argument("overrides", nargs="*", help="dotted overrides")
    pv.add_argument("--rows", type=int, default=3, help="rows to show")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    pv.set_defaults(func=cmd_data_preview)

    g = sub.add_parser("generate", help="generate with a trained run (adapter or full weights)")
    g.add_argument("run_dir", help="run directory (or its final/ directory)")
    g.add_argument("--prompt", help="a user message")
    g.add_argument("--file", help="JSONL with one {\"prompt\": ...} or {\"messages\": [...]} per line")
    g.add_argument("--system", help="system message to put before each prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=cmd_generate)

    ex = sub.add_parser("export", help="merge the adapter (if any) and write a Hugging Face model directory, "
                        "checked for logit parity", description="merge the adapter (if any) into its base in fp32, "
                        "write RUN/export (safetensors, config, generation_config with the stop ids, tokenizer with "
                        "its chat template), and compare its logits with base + adapter; exit 1 if they disagree")
    ex.add_argument("run_dir", help="run directory (or its final/ directory)")
    ex.add_argument("--out", help="output directory (default: RUN/export)")
    ex.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="weights dtype of the export (auto: the run's training precision)")
    ex.add_argument("--base", help="the adapter's base model directory, if it moved since training")
    ex.add_argument("--prompts", help="JSONL of {\"prompt\": ...} or {\"messages\": [...]} for the parity check "
                    "(default: held-out rows of the run's data)")
    ex.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 2GB)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API (batched, streaming) over a run or model directory",
                        description="serve RUN (adapter + base or full weights) or an exported directory at "
                        "/v1/chat/completions, /v1/completions, /v1/models and /health (needs the serve extra)")
    sv.add_argument("run_dir", help="run directory, its final/ directory, or an exported model directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other machines)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: env TUNEFORGE_API_KEY)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run's name)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="most sequences generated together")
    sv.add_argument("--batch-window-ms", type=float, default=0.0,
                    help="how long an idle server waits for more arrivals before starting a batch (later arrivals "
                    "join the running batch between decode steps anyway)")
    sv.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="chat with a run or model directory in the terminal (streaming, with history)")
    ch.add_argument("run_dir", help="run directory, its final/ directory, or an exported model directory")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a run on its held-out set (and the base model with --base)",
                        description="token-weighted loss/perplexity over RUN/data/eval and generation metrics (exact "
                        "match, normalised match, ROUGE-L, chrF, BLEU) for the fine-tuned model and, with --base, the "
                        "model before fine-tuning; prints metric/base/tuned/delta and writes RUN/eval.json")
    ev.add_argument("run_dir", help="run directory")
    ev.add_argument("--base", action="store_true", help="also evaluate the base model on the same rows")
    ev.add_argument("--rows", type=int, help="held-out rows to generate for (default: eval.generate_rows, else all)")
    ev.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    ev.add_argument("--temperature", type=float, help="default: the run's eval.temperature (0 = greedy)")
    ev.add_argument("--top-p", type=float, help="default: the run's eval.top_p")
    ev.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    ev.add_argument("--progress", choices=["auto", "bar", "plain", "json", "none"], help="default: the run's log.progress")
    ev.add_argument("--lm-eval", metavar="TASK[,TASK]", help="also run lm-evaluation-harness tasks (needs `pip install "
                    "lm-eval` and network access for its datasets)")
    ev.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task (default: all)")
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="write RUN/plots/*.png, RUN/report.md and a self-contained RUN/report.html")
    rp.add_argument("run_dir", help="run directory")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="final metrics of several runs side by side and their loss curves in one PNG")
    cp.add_argument("runs", nargs="+", help="run directories")
    cp.add_argument("--out", default="compare_loss.png", help="PNG to write (default: ./compare_loss.png)")
    cp.set_defaults(func=cmd_compare)

    sub.add_parser("reference", help="print every config key, its default and meaning").set_defaults(func=cmd_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options (train CONFIG --resume never train.lr=1e-4)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except Exception as e:  # a clear one-line reason for the known failure kinds; tracebacks for the rest
        from tuneforge.data.formats import DataFormatError
        from tuneforge.data.templates import TemplateError
        from tuneforge.data.tokenizer import TokenizerLoadError
        from tuneforge.model.load import ModelLoadError
        from tuneforge.train.checkpoint import CheckpointError
        from tuneforge.train.signals import BadStepsError, TrainingStopped

        if isinstance(e, TrainingStopped):
            _err(str(e))
            return e.exit_code
        if isinstance(e, CheckpointError):
            _err(str(e))
            return EXIT_CONFIG
        if isinstance(e, (DataFormatError, TemplateError, TokenizerLoadError, ModelLoadError, BadStepsError)):
            _err(str(e))
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
