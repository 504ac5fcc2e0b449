"""`tuneforge serve` (continuous batching) vs sequential `model.generate` calls: requests/s and tokens/s.

The baseline is the seed's deployment: one request at a time through `model.generate` (KV-cached,
greedy), so its throughput does not depend on how many clients wait. The server runs as a real subprocess
on 127.0.0.1 and is loaded by 1, 8 and 32 concurrent clients (non-streaming chat completions, greedy, so
both sides generate the same tokens; 16, 32 and 128 requests). Both sides use the same number of torch threads.

Model: a random-init Llama the size of the quickstart (hidden 256, 2 layers, 8 heads, context 256) with a
BPE tokenizer trained on the synthetic task, built locally; or `--model RUN_OR_DIR` for a real run.

  python benchmarks/serve_throughput.py [--model runs/quickstart] [--max-tokens 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["Reverse the order of these words.\n\n{}", "Sort these words alphabetically.\n\n{}"]


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.data.synthetic import generate
    from tuneforge.data.tokenizer import train_bpe_tokenizer

    rows = generate("reverse_words", 2000, seed=0)
    tok = train_bpe_tokenizer([f"{r['instruction']}\n\n{r['input']} {r['output']}" for r in rows], 1000)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "tuneforge.json").write_text(json.dumps({"stop_token_ids": [tok.eos_token_id]}))
    return out


def chats(n: int) -> list[list[dict]]:
    from tuneforge.data.synthetic import WORDS

    return [
        [
            {
                "role": "user",
                "content": PROMPTS[i % 2].format(" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4))),
            }
        ]
        for i in range(n)
    ]


def sequential_generate(model_dir: Path, requests: int, max_tokens: int) -> dict:
    """The seed's way: each request alone through `model.generate`."""
    import torch

    from tuneforge.data.masks import prompt_ids
    from tuneforge.serve.loading import load_served

    served = load_served(model_dir, device="cpu")
    tok = served.tokenizer
    ids = [prompt_ids(tok, served.chat_template, c) for c in chats(requests)]
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            out = served.model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=served.stop_token_ids,
                pad_token_id=tok.pad_token_id,
            )
            tokens += out.shape[1] - len(p)
    wall = time.perf_counter() - t0
    return {"requests": requests, "tokens": tokens, "wall_s": wall}


def load_server(port: int, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients, each sending its share of the requests one after another on a keep-alive connection.
    Threads with `http.client` (~0.2 ms CPU per request) rather than an async client (~3 ms with httpx): on a
    small machine the client shares the CPU with the server, and a heavy client would measure itself."""
    per, tokens, errors = requests // concurrency, [0], [0]
    todo = chats(per * concurrency)
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for messages in todo[k * per : (k + 1) * per]:
            conn.request(
                "POST",
                "/v1/chat/completions",
                headers={"Content-Type": "application/json"},
                body=json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}),
            )
            resp = conn.getresponse()
            body = json.loads(resp.read())
            with lock:
                if resp.status != 200:
                    errors[0] += 1
                else:
                    tokens[0] += body["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": per * concurrency, "tokens": tokens[0], "wall_s": time.perf_counter() - t0, "errors": errors[0]}


def start_server(model_dir: Path, threads: int, window_ms: float) -> tuple[subprocess.Popen, int]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneforge.cli",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--max-batch-size",
            "32",
            "--batch-window-ms",
            str(window_ms),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run or model directory (default: build a quickstart-sized random model)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--baseline-requests", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=0.0, help="the server's --batch-window-ms")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "bench-model")
        first = sequential_generate(model_dir, args.baseline_requests, args.max_tokens)
        proc, port = start_server(model_dir, args.threads, args.batch_window_ms)
        try:
            load_server(port, 4, 1, args.max_tokens)  # warm-up
            runs = {c: load_server(port, max(16, 4 * c), c, args.max_tokens) for c in (1, 8, 32)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # measured before and after the server runs; the faster counts, so that a busy machine flatters no one
        base = min(
            first, sequential_generate(model_dir, args.baseline_requests, args.max_tokens), key=lambda r: r["wall_s"]
        )

    def rates(r: dict) -> tuple[float, float]:
        return r["requests"] / r["wall_s"], r["tokens"] / r["wall_s"]

    base_rps, base_tps = rates(base)
    print(
        f"\nmodel: {args.model or 'random quickstart-sized Llama'}; max_tokens {args.max_tokens}; "
        f"{args.threads} torch thread(s); greedy\n"
    )
    print(f"{'mode':<34}{'requests':>9}{'req/s':>9}{'tokens/s':>10}{'errors':>8}{'x generate':>12}")
    print(f"{'sequential model.generate':<34}{base['requests']:>9}{base_rps:>9.2f}{base_tps:>10.1f}{0:>8}{1.0:>12.2f}")
    for c, r in runs.items():
        rps, tps = rates(r)
        print(
            f"{f'tuneforge serve, concurrency {c}':<34}{r['requests']:>9}{rps:>9.2f}{tps:>10.1f}{r['errors']:>8}"
            f"{tps / base_tps:>12.2f}"
        )
    print("\n(x generate = tokens/s relative to sequential model.generate)")


if __name__ == "__main__":
    main()
