"""Kill a real `tuneforge train` process at many points, resume it, and get exactly the uninterrupted run.

LoRA with dropout (so RNG state matters), packing, gradient accumulation 2, eval every 4 steps,
checkpoints every 3. The interrupted run dies: inside a micro-batch (mid-accumulation), inside a
checkpoint write (at the rename), by an outside SIGKILL at a random step, and by SIGTERM (graceful).
Per-step losses and the final adapter weights must be identical, not close.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent
CONFIG = {
    "model": {
        "init": {
            "architecture": "llama",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "max_position_embeddings": 128,
            "tokenizer_vocab_size": 400,
        }
    },
    "data": {
        "train": [{"synthetic": {"task": "reverse_words", "rows": 240, "seed": 0}}],
        "eval_fraction": 0.1,
        "max_seq_len": 128,
        "packing": True,
    },
    "adapter": {"type": "lora", "r": 8, "dropout": 0.1},
    "train": {
        "lr": 1e-3,
        "max_steps": 20,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "warmup_steps": 2,
        "seed": 3,
        "threads": 1,
    },
    "eval": {"every_steps": 4, "at_start": True, "show_samples": 0},
    "checkpoint": {"every_steps": 3, "save_total_limit": 2},
    "log": {"every_steps": 1, "progress": "none"},
}


def write_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    run = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output": {"dir": str(run)}}))
    return path, run


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def tuneforge(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "train", *args], env=env(), capture_output=True, text=True, timeout=600
    )


def crash(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "crash_run.py"), *args], env=env(), capture_output=True, text=True, timeout=600
    )


def train_steps(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]


def last_step(run: Path) -> int:
    try:
        steps = train_steps(run)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return steps[-1][0] if steps else 0


def signal_at_step(config: Path, run: Path, step: int, sig: int) -> subprocess.CompletedProcess:
    """Start training, send `sig` once `step` is logged, wait for the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "train", str(config)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while last_step(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    straight_cfg, straight = write_config(tmp_path, "straight")
    r = tuneforge(str(straight_cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = train_steps(straight)
    assert [s for s, _ in expected] == list(range(1, 21))

    cfg, run = write_config(tmp_path, "interrupted")
    # 1. SIGKILL inside the first micro-batch of step 5 (micro-batch 9): resumes from step 3
    r = crash("micro", "9", str(cfg))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000003"]
    # 2. resumes from 3, saves 6, is killed during the save of step 9 just before its rename
    r = crash("save", "rename", "2", str(cfg))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run / "checkpoints" / ".tmp-step-000009").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    # 3. an outside SIGKILL at a random step
    kill_step = random.Random(os.getpid()).randint(10, 13)
    r = signal_at_step(cfg, run, kill_step, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step-000006" in r.stdout
    # 4. SIGTERM (pre-emption): finishes the step, checkpoints it, exits 143 saying how to resume
    r = signal_at_step(cfg, run, 15, signal.SIGTERM)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    stopped = int(r.stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped >= 15 and f"checkpoints/step-{stopped:06d} written" in r.stderr
    assert "Run the same `tuneforge train` command again to resume" in r.stderr
    # 5. the last resume finishes the run
    r = tuneforge(str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-{stopped:06d}" in r.stdout

    assert train_steps(run) == expected  # exactly the same losses, not approximately
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def evals(d):
        return [
            json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if json.loads(x)["type"] == "eval"
        ]

    assert [(e["step"], e["eval_loss"]) for e in evals(run)] == [(e["step"], e["eval_loss"]) for e in evals(straight)]
