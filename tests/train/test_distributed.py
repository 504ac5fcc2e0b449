"""Several processes (DDP over gloo on this CPU, launched by `tuneforge train --nproc 2`): the same numbers as
one process with the same global batch, data prepared once, and a dead rank ends the job instead of hanging it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

pytestmark = pytest.mark.integration


def config(tmp_path: Path, name: str, adapter: dict, micro: int, **train) -> Path:
    cfg = {
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
        # uneven lengths (sort_words rows vary), so ranks pad differently from the single process
        "data": {
            "train": [{"synthetic": {"task": "sort_words", "rows": 72, "seed": 0}}],
            "eval_fraction": 0.125,
            "max_seq_len": 64,
        },
        "adapter": adapter,
        "train": {
            "lr": 5e-3,
            "max_steps": 6,
            "micro_batch_size": micro,
            "grad_accum": 2,
            "warmup_steps": 0,
            "seed": 3,
            **train,
        },
        "eval": {"at_start": False, "show_samples": 0, "every_steps": 3},
        "log": {"every_steps": 1, "progress": "none"},
        "checkpoint": {"every_steps": 2},
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tuneforge(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True, timeout=300, **kw
    )


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = run / "final"
    return load_file(
        final / ("adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors")
    )


def test_two_processes_give_the_same_losses_and_weights_as_one(tmp_path):
    # LoRA here; full fine-tuning on several processes is compared with one process in test_strategies (FSDP2)
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    one = tuneforge("train", config(tmp_path, "one", adapter, micro=4))
    assert one.returncode == 0, one.stderr[-3000:]
    two = tuneforge("train", config(tmp_path, "two", adapter, micro=2), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed: 2 processes, DistributedDataParallel, backend gloo; global micro-batch 4 rows" in two.stdout
    # data prepared once, before launch: both ranks found it cached
    assert two.stdout.count("data: reusing prepared data") == 1 and "launching 2 processes" in two.stdout

    s1 = json.loads((tmp_path / "one" / "run_summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert (s1["world_size"], s2["world_size"], s2["wrapper"]) == (1, 2, "DistributedDataParallel")
    assert s1["trained_tokens"] == s2["trained_tokens"] and s1["tokens"] == s2["tokens"]
    l1 = [r["loss"] for r in records(tmp_path / "one", "train")]
    l2 = [r["loss"] for r in records(tmp_path / "two", "train")]
    assert len(l1) == len(l2) == 6
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    assert l1[-1] < l1[0]
    e1 = [r["eval_loss"] for r in records(tmp_path / "one", "eval")]
    e2 = [r["eval_loss"] for r in records(tmp_path / "two", "eval")]
    torch.testing.assert_close(torch.tensor(e2), torch.tensor(e1), rtol=1e-5, atol=0)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        # Adam divides by sqrt(v): a gradient entry within rounding of zero can move its weight by a fraction of
        # lr either way (gloo sums in another order than one process). Everything else must agree to 1e-6.
        diff = (w2[k] - w1[k]).abs()
        assert int((diff > 1e-6).sum()) <= max(2, diff.numel() // 1000) and float(diff.max()) < 6 * 5e-3, k
    # only rank 0 writes: one line per step, one summary
    assert len(records(tmp_path / "two", "train")) == 6

    # the 2-process run's step-2 checkpoint continues on 1 process (same rows per step): the 1-process losses
    cont = tuneforge(
        "train",
        config(tmp_path, "cont", adapter, micro=4),
        "--resume",
        tmp_path / "two" / "checkpoints" / "step-000002",
    )
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert "resuming from" in cont.stdout and "train.micro_batch_size: 2 -> 4" in cont.stdout
    l3 = [r["loss"] for r in records(tmp_path / "cont", "train")]
    assert len(l3) == 4
    torch.testing.assert_close(torch.tensor(l3), torch.tensor(l1[2:]), rtol=1e-5, atol=0)


def _worker(root_pid: int, rank: int) -> psutil.Process | None:
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "tuneforge.cli" in " ".join(p.cmdline()):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_ends_the_job_with_its_rank_named_and_the_run_resumes(tmp_path):
    cfg = config(tmp_path, "kill", {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, micro=2, max_steps=400)
    run = tmp_path / "kill"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "train", str(cfg), "--nproc", "2", "dist.timeout_minutes=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():  # training is under way on both ranks
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        victim = _worker(proc.pid, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        t = time.monotonic()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - t < 60  # no hang on the dead peer
    assert proc.returncode == 1
    assert "rank: 1" in err and "SIGKILL" in err  # the launcher's report
    assert "training on 2 processes failed" in err and "Run the same command again to resume" in err

    # the same command resumes the 2-process run from its latest checkpoint and finishes it (shortened to two more
    # steps: a changed train.max_steps is an allowed change, listed when resuming)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    killed_at = json.loads((latest / "manifest.json").read_text())["step"]
    end = killed_at + 2
    done = tuneforge("train", cfg, "--nproc", "2", "dist.timeout_minutes=1", f"train.max_steps={end}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints'}" in done.stdout and f"(step {killed_at} of {end}" in done.stdout
    assert [r["step"] for r in records(run, "train")] == list(range(1, end + 1))
