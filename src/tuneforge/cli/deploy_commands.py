"""export, serve, chat."""

from __future__ import annotations

from tuneforge.cli.console import EXIT_CONFIG, EXIT_FAILED, _err, read_prompt_file


# ---------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from tuneforge.export import ExportError, ExportParityError, GGUFCheckError, export_run

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    try:
        result = export_run(
            args.run_dir,
            args.out,
            args.dtype,
            prompts,
            base_model=args.base,
            max_shard_size=args.max_shard_size,
            gguf=args.gguf_type if args.gguf else None,
        )
    except (ExportParityError, GGUFCheckError) as e:  # the numbers disagree: a failed check
        _err(str(e))
        return EXIT_FAILED
    except ExportError as e:  # inputs: the message names the file or option and the fix
        _err(str(e))
        return EXIT_CONFIG
    print(
        f"export ok: {result.out_dir} ({result.dtype}{', merged ' + result.adapter if result.merged else ''}); "
        f"parity report in {result.out_dir / 'parity.json'}" + (f"; GGUF {result.gguf}" if result.gguf else "")
    )
    return 0


# ---------------------------------------------------------------------------- serve / chat
def cmd_serve(args) -> int:
    import os

    from tuneforge.serve import SERVE_EXTRA_HINT, missing_serve_deps

    missing = missing_serve_deps()
    if missing:
        _err(f"tuneforge serve needs {' and '.join(missing)} (not installed): {SERVE_EXTRA_HINT}")
        return EXIT_FAILED
    from tuneforge.serve.compile import CompileError
    from tuneforge.serve.limits import RequestLimits, exposure_error
    from tuneforge.serve.loading import load_served
    from tuneforge.serve.server import run_server

    api_key = args.api_key or os.environ.get("TUNEFORGE_API_KEY") or None
    refused = exposure_error(args.host, api_key, args.allow_unauthenticated)
    if refused:  # before loading the model: the answer does not depend on it
        _err(refused)
        return EXIT_CONFIG
    for flag, value in (
        ("--max-request-bytes", args.max_request_bytes),
        ("--max-sequences-per-request", args.max_sequences_per_request),
    ):
        if value < 1:
            _err(f"{flag} must be at least 1, got {value}")
            return EXIT_CONFIG
    limits = RequestLimits(args.max_request_bytes, args.max_sequences_per_request)
    served = load_served(args.run_dir, name=args.model_name, device=args.device)
    if args.max_kv_tokens is not None and args.max_kv_tokens < served.context_length:
        _err(
            f"--max-kv-tokens {args.max_kv_tokens} is less than the model's context ({served.context_length} tokens, "
            "max_position_embeddings in its config.json): one full-length request would never fit; use at least "
            f"{served.context_length}, or leave it out for no limit"
        )
        return EXIT_CONFIG
    try:
        run_server(
            served,
            args.host,
            args.port,
            api_key,
            args.max_batch_size,
            args.batch_window_ms,
            max_kv_tokens=args.max_kv_tokens,
            compile_model_first=args.compile,
            limits=limits,
            allow_unauthenticated=args.allow_unauthenticated,
        )
    except CompileError as e:
        _err(str(e))
        return EXIT_FAILED
    return 0


def cmd_chat(args) -> int:
    from tuneforge.infer.engine import Engine
    from tuneforge.serve.chat import run_chat
    from tuneforge.serve.loading import load_served

    served = load_served(args.run_dir, device=args.device)
    engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length, max_batch_size=1)
    engine.start()
    try:
        return run_chat(served, engine, args.max_new_tokens, args.temperature, args.top_p, args.system)
    finally:
        engine.stop()
