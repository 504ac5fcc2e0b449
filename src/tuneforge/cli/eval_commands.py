"""eval, report, compare, generate."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.cli.console import EXIT_CONFIG, EXIT_FAILED, _err, read_prompt_file
from tuneforge.config.load import load_config


# ---------------------------------------------------------------------------- eval / report / compare
def cmd_eval(args) -> int:
    import torch

    from tuneforge.data.prepare import load_prepared
    from tuneforge.eval.harness import LmEvalMissing, require_lm_eval, run_lm_eval
    from tuneforge.eval.runner import (
        EvalError,
        ModelEval,
        base_model,
        comparison_table,
        evaluate_model,
        write_eval_json,
    )
    from tuneforge.model.load import load_trained

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        _err(f"{run_dir}: no config.yaml here; give a run directory written by `tuneforge train`")
        return EXIT_CONFIG
    if not (run_dir / "data" / "eval").exists():
        _err(
            f"{run_dir}: no held-out set in {run_dir / 'data' / 'eval'}; train with data.eval_fraction > 0 "
            "or data.eval set to have one"
        )
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

    windows = None
    if cfg.eval.general_text:  # the forgetting check of the run, on the same text
        from tuneforge.eval.general_text import general_text_windows

        windows = general_text_windows(cfg.eval.general_text, tok, cfg.eval.general_text_tokens, cfg.data.max_seq_len)

    def run(m, label: str) -> ModelEval:
        result = evaluate_model(m, tok, data.eval, cfg.eval, stops, rows, progress, label)
        if windows:
            from tuneforge.eval.general_text import general_text_perplexity

            result.metrics.update(general_text_perplexity(m, windows, cfg.eval.batch_size, tok.pad_token_id))
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
    settings = {
        "rows": len(data.eval),
        "generated_rows": tuned.metrics.get("generated_rows", 0),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
    }
    out = write_eval_json(run_dir, tuned, base, settings)
    print(
        f"held-out set: {len(data.eval)} rows ({settings['generated_rows']} generated, "
        f"max_new_tokens {cfg.eval.max_new_tokens}, temperature {cfg.eval.temperature:g})\n"
    )
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
        chats = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in read_prompt_file(args.file)]
    if args.system:
        chats = [[{"role": "system", "content": args.system}, *c] for c in chats]
    model, tok, info = load_trained(args.run_dir)
    outs = generate(
        model,
        tok,
        chats,
        args.max_new_tokens,
        info.get("stop_token_ids"),
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if args.prompt is not None:
        print(outs[0])
    else:
        for c, o in zip(chats, outs):
            print(json.dumps({"prompt": c[-1]["content"], "completion": o}, ensure_ascii=False))
    return 0
