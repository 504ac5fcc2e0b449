"""`tuneforge serve` under hostile load: 64 streaming clients and hostile requests at the same time, /health timed.

What must hold: no 5xx answer at all, every hostile request refused with its 4xx (or, for a client that leaves
mid-body, nothing answered and the server still serving), every stream ending with `data: [DONE]`, and /health
answering with p99 under 100 ms meanwhile.

- streams: 64 client threads (http.client: a light client, the server gets the CPU), each running `--rounds`
  streaming chat completions of `--max-tokens` tokens one after another.
- hostile: `--hostile-workers` threads sending, `--hostile-rounds` times each, every kind in HOSTILE: an
  oversized body (Content-Length and chunked), an n-flood (2000 prompts x n=16), a 3.9 MB prompt (refused by its
  characters), a 400k-character prompt and chat message (must be tokenised before the context check refuses
  them: the model's context is 32768 tokens), malformed JSON, and a client that leaves mid-body.
- /health: polled every 20 ms from a separate process (so the client's own threads do not delay it), on one
  keep-alive connection, for the whole run; latency percentiles over all polls.

Model: a random 2-layer Llama (hidden 64, context 32768) with a BPE tokenizer trained on the synthetic task,
built locally, or `--model RUN_OR_DIR`. The server runs as a real `tuneforge serve` subprocess on 127.0.0.1.

  python benchmarks/serve_load.py [--repeat 3] [--clients 64] [--rounds 8] [--max-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

CONTEXT = 32768
FLOOD = json.dumps({"prompt": ["apple river stone"] * 2000, "n": 16, "max_tokens": 1}).encode()
HOSTILE = {  # kind -> (path, body or None for the special cases, expected status)
    "oversized body": ("/v1/completions", b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}', 413),
    "oversized chunked body": ("/v1/chat/completions", None, 413),
    "n-flood 2000 prompts x n=16": ("/v1/completions", FLOOD, 400),
    "3.9 MB prompt": ("/v1/completions", json.dumps({"prompt": "apple " * 650_000}).encode(), 400),
    "400k-char prompt (tokenised)": (
        "/v1/completions",
        json.dumps({"prompt": "apple river stone " * 22_000}).encode(),
        400,
    ),
    "400k-char chat (tokenised)": (
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "apple river stone " * 22_000}]}).encode(),
        400,
    ),
    "malformed JSON": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"', 400),
    "disconnect mid-body": ("/v1/chat/completions", None, None),
}


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.data.synthetic import generate
    from tuneforge.data.tokenizer import train_bpe_tokenizer

    rows = generate("reverse_words", 200, seed=0)
    tok = train_bpe_tokenizer([f"{r['instruction']}\n\n{r['input']} {r['output']}" for r in rows], 400)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "tuneforge.json").write_text(json.dumps({"stop_token_ids": [tok.eos_token_id]}))
    return out


def start_server(model_dir: Path, threads: int, log: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", str(model_dir), "--port", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


# ---------------------------------------------------------------------------- the clients
def probe_health(port: int, stop, out, interval: float) -> None:
    """In its own process: GET /health every `interval` s until `stop`; puts [(latency_s, status, sent_at)]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            samples.append((time.perf_counter() - t0, resp.status, time.time()))
        except OSError as e:
            samples.append((time.perf_counter() - t0, f"error {type(e).__name__}", time.time()))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        time.sleep(interval)
    out.put(samples)


def stream_client(port: int, k: int, rounds: int, max_tokens: int, record) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for r in range(rounds):
        body = {
            "messages": [{"role": "user", "content": f"request {k}.{r}: apple river stone"}],
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "stream_options": {"include_usage": True},
        }
        try:
            conn.request(
                "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            done, tokens = False, 0
            while line := resp.readline():
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data: {") and b'"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            record("stream", resp.status if done else f"{resp.status} without [DONE]", tokens)
        except OSError as e:
            record("stream", f"error {type(e).__name__}", 0)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)


def hostile_request(port: int, kind: str) -> int | str | None:
    path, body, _ = HOSTILE[kind]
    if kind == "disconnect mid-body":
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n".encode()
                + b'{"messages": ['
            )
            time.sleep(0.1)
        return None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        if body is None:  # chunked, no Content-Length
            conn.request(
                "POST",
                path,
                body=(b"a" * 2**20 for _ in range(6)),
                encode_chunked=True,
                headers={"Content-Type": "application/json"},
            )
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError as e:  # the server closed the connection before answering
        return f"closed ({type(e).__name__})"
    finally:
        conn.close()


def load_round(
    port: int, clients: int, rounds: int, max_tokens: int, hostile_workers: int, hostile_rounds: int
) -> dict:
    results: list[tuple[str, object, int]] = []
    lock = threading.Lock()

    def record(kind, status, tokens=0):
        with lock:
            results.append((kind, status, tokens))

    todo = [kind for _ in range(hostile_rounds) for kind in HOSTILE]
    next_item = iter(todo)

    def hostile_worker():
        while True:
            with lock:
                kind = next(next_item, None)
            if kind is None:
                return
            record(kind, hostile_request(port, kind))
            time.sleep(0.05)

    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=(port, stop, out, 0.02))
    prober.start()
    time.sleep(1.0)  # the prober is up (spawn imports) before the load starts
    t0, started = time.perf_counter(), time.time()
    threads = [
        threading.Thread(target=stream_client, args=(port, k, rounds, max_tokens, record)) for k in range(clients)
    ]
    threads += [threading.Thread(target=hostile_worker) for _ in range(hostile_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    health = out.get(timeout=60)
    prober.join(timeout=30)

    lat = sorted(s for s, status, _ in health if status == 200)
    slowest = max(health, key=lambda sample: sample[0])
    statuses = Counter(str(s) for kind, s, _ in results)
    five_xx = sum(1 for _, s, _ in results if isinstance(s, int) and s >= 500) + sum(
        1 for _, s, _ in health if not isinstance(s, int) or s != 200
    )
    unexpected = [(kind, s) for kind, s, _ in results if kind != "stream" and s != HOSTILE[kind][2]]
    streams = [(s, n) for kind, s, n in results if kind == "stream"]
    return {
        "wall_s": wall,
        "streams": len(streams),
        "streams_ok": sum(1 for s, _ in streams if s == 200),
        "tokens": sum(n for _, n in streams),
        "hostile": len(todo),
        "statuses": dict(statuses),
        "by_kind": {k: dict(Counter(str(s) for kind, s, _ in results if kind == k)) for k in HOSTILE},
        "unexpected": unexpected,
        "errors_5xx": five_xx,
        "health_polls": len(health),
        "health_p50_ms": 1000 * lat[len(lat) // 2],
        "health_max_ms": 1000 * lat[-1],
        "slowest_at_s": slowest[2] - started,
        "health_p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run or model directory (default: build a tiny random model, context 32768)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="streaming requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hostile-workers", type=int, default=4)
    ap.add_argument("--hostile-rounds", type=int, default=8, help="times each hostile kind is sent")
    ap.add_argument("--repeat", type=int, default=1, help="load rounds on the same server (median, min-max)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "load-model")
        log = Path(tmp) / "server.log"
        proc, port = start_server(model_dir, args.threads, log)
        try:
            runs = [
                load_round(port, args.clients, args.rounds, args.max_tokens, args.hostile_workers, args.hostile_rounds)
                for _ in range(args.repeat)
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        server_log = log.read_text()

    for i, r in enumerate(runs):
        print(
            f"round {i + 1}: {r['streams_ok']}/{r['streams']} streams ok ({r['tokens']} tokens) and "
            f"{r['hostile']} hostile requests in {r['wall_s']:.1f} s; 5xx: {r['errors_5xx']}; /health "
            f"p50 {r['health_p50_ms']:.1f} ms, p99 {r['health_p99_ms']:.1f} ms, max {r['health_max_ms']:.1f} ms "
            f"({r['health_polls']} polls; the slowest sent {r['slowest_at_s']:.1f} s into the load)"
        )
        for kind, got in r["by_kind"].items():
            print(f"    {kind:<32} {got}")
        if r["unexpected"]:
            print(f"    unexpected answers: {r['unexpected']}")

    def spread(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    tracebacks = server_log.count("Traceback")
    disconnects = sum(1 for line in server_log.splitlines() if "disconnected after" in line)
    print(
        f"\n{len(runs)} round(s): /health p50 {spread('health_p50_ms')} ms, p99 {spread('health_p99_ms')} ms, "
        f"max {spread('health_max_ms')} ms; wall {spread('wall_s')} s; server log: {disconnects} disconnect "
        f"line(s), {tracebacks} traceback(s)"
    )
    ok = (
        all(r["errors_5xx"] == 0 and not r["unexpected"] and r["streams_ok"] == r["streams"] for r in runs)
        and tracebacks == 0
        and max(r["health_p99_ms"] for r in runs) < 100
    )
    print("PASS: 0 5xx, every hostile request refused, every stream done, /health p99 < 100 ms" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
