"""Tiny models built locally (nothing downloaded) and a real `tuneforge serve` subprocess on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

CONTEXT = 128


def save_tiny_llama(out: Path, tok, hidden: int = 64, intermediate: int = 256, positions: int = CONTEXT) -> Path:
    """A 2-layer, 4-head Llama with random weights (seed 0) sized for `tok`, saved with it to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=positions,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama (random weights, fixed seed) with a BPE tokenizer trained on the synthetic task and the
    ChatML template: a plain Hugging Face directory, like an export."""
    from tuneforge.data.synthetic import generate
    from tuneforge.data.tokenizer import train_bpe_tokenizer

    rows = generate("reverse_words", 200, seed=0)
    tok = train_bpe_tokenizer([f"{r['instruction']}\n\n{r['input']} {r['output']}" for r in rows], 400)
    save_tiny_llama(out, tok)
    (out / "tuneforge.json").write_text(json.dumps({"stop_token_ids": [tok.eos_token_id]}))
    return out


def build_tiny_adapter_run(base: Path, run: Path) -> Path:
    """RUN/final holding a LoRA adapter (non-zero init, so it changes the outputs) over `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    final = run / "final"
    model.save_pretrained(final)
    AutoTokenizer.from_pretrained(base).save_pretrained(final)
    (final / "tuneforge.json").write_text((base / "tuneforge.json").read_text())
    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def tiny_adapter_run(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_adapter_run(tiny_model_dir, tmp_path_factory.mktemp("serve") / "lora-run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, *args: str, env: dict | None = None, timeout: float = 60.0):
    """`tuneforge serve MODEL_DIR` as a subprocess; yields its base URL (http://127.0.0.1:PORT) once /health answers."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", str(model_dir), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer /health in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def live_server(served, **kwargs):
    """create_app(...) under uvicorn on 127.0.0.1 in a thread (logging left to the test's handlers); yields its URL."""
    import uvicorn

    from tuneforge.infer.engine import Engine
    from tuneforge.serve.server import create_app

    engine = Engine(served.model, served.tokenizer, served.stop_token_ids, served.context_length)
    engine.start()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(served, engine, **kwargs),
            host="127.0.0.1",
            port=port,
            log_config=None,
            log_level="info",
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.stop()
