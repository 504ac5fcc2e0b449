"""DPO through the CLI, as the SFT runs of test_distributed.py and test_resume.py: two processes (DDP over gloo)
give one process's losses and adapter, and a run SIGKILLed inside a micro-batch resumes to exactly the
uninterrupted run's losses and weights (prompt shared by both completions, reference = adapter off)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.test_preference_loop import pairs_file

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


def write_config(tmp_path: Path, tiny_config_dict: dict, name: str, micro: int) -> tuple[Path, Path]:
    cfg = {**tiny_config_dict}
    cfg["data"] = {"train": [{"path": str(pairs_file(tmp_path, n=40))}], "eval_fraction": 0.1, "max_seq_len": 64}
    cfg["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    cfg["objective"] = {"type": "dpo", "beta": 0.5}
    cfg["train"] = {**cfg["train"], "lr": 5e-3, "max_steps": 6, "micro_batch_size": micro, "grad_accum": 2}
    cfg["checkpoint"] = {"every_steps": 2}
    cfg["output"] = {"dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / name


def cli(*args: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
    command = script or ["-m", "tuneforge.cli", "train"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=300)


def steps(run: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["rewards/accuracies"]) for r in lines if r["type"] == "train"]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_dpo_on_two_processes_and_after_a_kill_equals_one_uninterrupted_process(tmp_path, tiny_config_dict):
    cfg, one = write_config(tmp_path, tiny_config_dict, "one", micro=4)
    r = cli(str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = steps(one)
    assert [s for s, _, _ in expected] == [1, 2, 3, 4, 5, 6] and expected[-1][1] < expected[0][1]

    # two processes, half the micro-batch each: the same global batches
    cfg2, two = write_config(tmp_path, tiny_config_dict, "two", micro=2)
    r = cli(str(cfg2), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: 2 processes, DistributedDataParallel" in r.stdout
    got = steps(two)
    assert [s for s, _, _ in got] == [s for s, _, _ in expected]
    torch.testing.assert_close(
        torch.tensor([x[1:] for x in got]), torch.tensor([x[1:] for x in expected]), rtol=1e-5, atol=1e-6
    )
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # fp32 all-reduce sums in another order; Adam's 1/sqrt(v) amplifies that to ~4e-6 on weights ~0.1,
        # and an element whose gradient is ~0 moves by up to lr per step whatever its sign: 1.3e-5 seen (lr 5e-3)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)

    # SIGKILL inside the first micro-batch of step 4 (micro-batch 7): resumes from the step-2 checkpoint
    cfg3, killed = write_config(tmp_path, tiny_config_dict, "killed", micro=4)
    r = cli("micro", "7", str(cfg3), script=[str(HERE / "crash_run.py")])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000002"]
    r = cli(str(cfg3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {killed}/checkpoints/step-000002" in r.stdout
    assert steps(killed) == expected  # exactly, not approximately
    c = adapter(killed)
    for k in a:
        assert torch.equal(a[k], c[k]), k
