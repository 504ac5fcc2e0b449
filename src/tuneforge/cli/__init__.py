"""`tuneforge` command line: the only package that imports every stage (commands in *_commands.py).

tuneforge train CONFIG.yaml [key.path=value ...]      prepare data (if needed), train, evaluate, save final/
tuneforge prepare CONFIG.yaml [key.path=value ...]    the data stage only
tuneforge validate CONFIG.yaml [key.path=value ...]   check a config without loading anything heavy
tuneforge data preview CONFIG.yaml [--rows N]          prepared rows with the trained tokens marked
tuneforge generate RUN_DIR --prompt TEXT | --file prompts.jsonl
tuneforge reference                                    every config key with its default and meaning
tuneforge eval RUN_DIR [--base] [--lm-eval TASKS]      held-out loss/ppl + task metrics, base vs tuned
tuneforge report RUN_DIR                               plots + report.md + self-contained report.html
tuneforge compare RUN_A RUN_B ...                      final metrics side by side, loss curves in one PNG
tuneforge serve RUN_OR_MODEL_DIR [--port 8000]         OpenAI-compatible HTTP API (batched, streaming;
                 [--max-kv-tokens N] [--compile]       KV-cache budget, torch.compile)
tuneforge chat RUN_OR_MODEL_DIR                        terminal chat with history
tuneforge export RUN_DIR [--out DIR] [--dtype ...]     merge + Hugging Face directory, checked for logit parity
                 [--gguf [--gguf-type f16]]            + a GGUF file for llama.cpp / Ollama, read back and checked
tuneforge plan CONFIG.yaml [--gpus N --gpu-mem 80GiB]  peak memory per device before loading anything
"""

from __future__ import annotations

import argparse
import sys

from tuneforge.cli.console import _err
from tuneforge.cli.data_commands import cmd_data_preview, cmd_prepare, cmd_reference, cmd_validate
from tuneforge.cli.deploy_commands import cmd_chat, cmd_export, cmd_serve
from tuneforge.cli.eval_commands import cmd_compare, cmd_eval, cmd_generate, cmd_report
from tuneforge.cli.train_commands import cmd_plan, cmd_train
from tuneforge.errors import TuneforgeError


# ---------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.max_seq_len=512")
        return sp

    tr = with_config(
        "train", "prepare data if needed, train (resuming from the latest checkpoint), evaluate, save final/"
    )
    tr.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto: continue from <run>/checkpoints/latest if the run is unfinished (default); "
        "never: start from step 0; PATH: continue from that checkpoint directory",
    )
    tr.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="processes (GPUs, or CPU processes) on this node; >1 launches torchrun (DDP)",
    )
    tr.add_argument("--nnodes", type=int, default=1, help="nodes in the job (multi-node: run the same command on each)")
    tr.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    tr.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node)")
    tr.add_argument(
        "--master-port", type=int, default=None, help="port on node 0 (default: a free one; 29500 multi-node)"
    )
    tr.set_defaults(func=cmd_train)
    with_config("validate", "check a config (no model or data loaded)").set_defaults(func=cmd_validate)
    pl = with_config(
        "plan",
        "estimate peak memory per device (weights, gradients, optimizer, activations, logits) "
        "before loading anything; exit 1 when it does not fit",
    )
    pl.add_argument("--gpus", type=int, default=None, help="plan for N GPUs (DDP: the same per device)")
    pl.add_argument(
        "--gpu-mem", default=None, help="memory per device, e.g. 80GiB (default: what this machine has free)"
    )
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
    g.add_argument("--file", help='JSONL with one {"prompt": ...} or {"messages": [...]} per line')
    g.add_argument("--system", help="system message to put before each prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=cmd_generate)

    ex = sub.add_parser(
        "export",
        help="merge the adapter (if any) and write a Hugging Face model directory, checked for logit parity",
        description="merge the adapter (if any) into its base in fp32, "
        "write RUN/export (safetensors, config, generation_config with the stop ids, tokenizer with "
        "its chat template), and compare its logits with base + adapter; exit 1 if they disagree",
    )
    ex.add_argument("run_dir", help="run directory (or its final/ directory)")
    ex.add_argument("--out", help="output directory (default: RUN/export)")
    ex.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights dtype of the export (auto: the run's training precision)",
    )
    ex.add_argument("--base", help="the adapter's base model directory, if it moved since training")
    ex.add_argument(
        "--prompts",
        help='JSONL of {"prompt": ...} or {"messages": [...]} for the parity check '
        "(default: held-out rows of the run's data)",
    )
    ex.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 2GB)")
    ex.add_argument(
        "--gguf",
        action="store_true",
        help="also write OUT/<run>-<TYPE>.gguf for llama.cpp / Ollama (llama, mistral and qwen2 models; "
        "needs `pip install 'tuneforge[gguf]'`), read it back and compare every tensor and the tokenizer; "
        "exit 1 and no file if they differ",
    )
    ex.add_argument(
        "--gguf-type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="GGUF weights type (norms and biases stay f32; default f16)",
    )
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (batched, streaming) over a run or model directory",
        description="serve RUN (adapter + base or full weights) or an exported directory at "
        "/v1/chat/completions, /v1/completions, /v1/models and /health (needs the serve extra)",
    )
    sv.add_argument("run_dir", help="run directory, its final/ directory, or an exported model directory")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, this machine only). Any other address (0.0.0.0 to "
        "accept other machines) needs --api-key, or --allow-unauthenticated",
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 routes and on /docs, /redoc, "
        "/openapi.json (default: env TUNEFORGE_API_KEY; /health stays open)",
    )
    sv.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without an API key (only behind a trusted network)",
    )
    sv.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        metavar="N",
        help="largest request body accepted, in bytes; larger ones get 413 (default 4194304 = 4 MiB, "
        "a 128k-token prompt in any JSON encoding)",
    )
    sv.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=256,
        metavar="N",
        help="most sequences one request may ask for, prompts x n; more get 400 (default 256)",
    )
    sv.add_argument("--model-name", help="the model id clients send (default: the run's name)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="most sequences generated together")
    sv.add_argument(
        "--batch-window-ms",
        type=float,
        default=0.0,
        help="how long an idle server waits for more arrivals before starting a batch (later arrivals "
        "join the running batch between decode steps anyway)",
    )
    sv.add_argument(
        "--max-kv-tokens",
        type=int,
        default=None,
        metavar="N",
        help="KV-cache budget in token positions (rows x longest row; the startup line gives MiB): a "
        "request joins the batch only while every running request could still reach its max_tokens "
        "within N, else it waits. At least the model's context. Default: no limit (bounded by "
        "--max-batch-size x context)",
    )
    sv.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (dynamic shapes), compiled at startup before the server "
        "opens; same outputs, less per-step overhead (most on GPUs and small models). Exit 1 with "
        "the reason if torch.compile is unavailable",
    )
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

    ev = sub.add_parser(
        "eval",
        help="evaluate a run on its held-out set (and the base model with --base)",
        description="token-weighted loss/perplexity over RUN/data/eval and generation metrics (exact "
        "match, normalised match, ROUGE-L, chrF, BLEU) for the fine-tuned model and, with --base, the "
        "model before fine-tuning; prints metric/base/tuned/delta and writes RUN/eval.json",
    )
    ev.add_argument("run_dir", help="run directory")
    ev.add_argument("--base", action="store_true", help="also evaluate the base model on the same rows")
    ev.add_argument("--rows", type=int, help="held-out rows to generate for (default: eval.generate_rows, else all)")
    ev.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    ev.add_argument("--temperature", type=float, help="default: the run's eval.temperature (0 = greedy)")
    ev.add_argument("--top-p", type=float, help="default: the run's eval.top_p")
    ev.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    ev.add_argument(
        "--progress", choices=["auto", "bar", "plain", "json", "none"], help="default: the run's log.progress"
    )
    ev.add_argument(
        "--lm-eval",
        metavar="TASK[,TASK]",
        help="also run lm-evaluation-harness tasks (needs `pip install lm-eval` and network access for its datasets)",
    )
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
    except TuneforgeError as e:  # every stage's errors for people: the message, no traceback (tuneforge/errors.py)
        _err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
