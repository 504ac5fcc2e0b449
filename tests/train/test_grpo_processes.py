"""GRPO through the CLI, as DPO's test_preference_processes.py: two processes (DDP over gloo) sample the same
completions as one (every completion on its own random stream) and give one process's rewards, losses and
adapter; a run SIGKILLed inside a micro-batch's update resumes to exactly the uninterrupted run, rollouts
included."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.test_preference_processes import HERE, adapter, cli

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, tiny_config_dict: dict, name: str, micro: int) -> Path:
    cfg = {**tiny_config_dict}
    cfg["data"] = {"train": [{"synthetic": {"task": "add", "rows": 40, "seed": 0}}], "eval_fraction": 0.1}
    cfg["data"]["max_seq_len"] = 64
    cfg["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    rewards = [{"type": "format", "pattern": "[aeiou][^aeiou ]"}, {"type": "numeric", "weight": 0.5}]
    cfg["objective"] = {"type": "grpo", "grpo": {"generations": 4, "max_new_tokens": 6, "rewards": rewards}}
    cfg["train"] = {**cfg["train"], "lr": 1e-2, "max_steps": 4, "micro_batch_size": micro, "grad_accum": 2}
    cfg["eval"] = {"at_start": False}
    cfg["checkpoint"] = {"every_steps": 2}
    cfg["output"] = {"dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps(run: Path) -> list[dict]:
    keys = ("step", "loss", "reward", "rewards/format", "completion_len", "groups_all_equal")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys} for r in lines if r["type"] == "train"]


def test_grpo_on_two_processes_and_after_a_kill_equals_one_uninterrupted_process(tmp_path, tiny_config_dict):
    r = cli(str(write_config(tmp_path, tiny_config_dict, "one", micro=2)))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = steps(tmp_path / "one")
    assert [s["step"] for s in expected] == [1, 2, 3, 4]
    assert all(s["groups_all_equal"] < 1 for s in expected)  # rewards vary within groups: real gradients
    assert len({s["reward"] for s in expected}) > 1

    # two processes, one prompt row per micro-batch each: the same rows per step, the same completions
    r = cli(str(write_config(tmp_path, tiny_config_dict, "two", micro=1)), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: 2 processes, DistributedDataParallel" in r.stdout
    got = steps(tmp_path / "two")
    for a, b in zip(got, expected, strict=True):
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"], (a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:  # fp32 all-reduce sums in another order; Adam moves an element whose gradient is ~0 by up to lr
        # per step whatever its sign, so rounding noise there shows up to ~1e-4 (1/100 of a step at lr 1e-2)
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-4, msg=k)

    # SIGKILL inside step 3's first micro-batch update, after its rollouts (2 micro-batches of 2 prompts per step,
    # one loss_sum each: GRPO does not join micro-batches into passes): resumes from the step-2 checkpoint
    cfg = write_config(tmp_path, tiny_config_dict, "killed", micro=2)
    r = cli("micro", "5", str(cfg), script=[str(HERE / "crash_run.py")])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000002"]
    r = cli(str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {killed}/checkpoints/step-000002" in r.stdout
    assert steps(killed) == expected  # exactly: the same rollouts, rewards and losses
    resumed = adapter(killed)
    for k in one:
        assert torch.equal(resumed[k], one[k]), k


def all_equal_on_rank_0(prompts, completions, rows):
    """In a 2-process run: every group of process 0 has equal rewards (nothing of its to run), process 1's vary."""
    if os.environ.get("WORLD_SIZE", "1") == "2" and os.environ.get("RANK") == "0":
        return [1.0] * len(completions)
    return [float(len(c) % 3) for c in completions]


def test_a_process_with_nothing_to_run_joins_the_others_update(tmp_path, tiny_config_dict):
    """skip_zero_advantage on 2 processes where one has only zero advantages and the other has gradients: the
    processes agree on which micro-batches run, the idle one runs a zero-gradient completion to join the
    all-reduce, and the run equals the one with every completion through the update (no hang, same weights)."""
    runs = {}
    for skip in (True, False):
        path = write_config(tmp_path, tiny_config_dict, f"skip-{skip}", micro=1)
        cfg = yaml.safe_load(path.read_text())
        cfg["objective"]["grpo"]["rewards"] = [{"function": f"{__name__}:all_equal_on_rank_0"}]
        cfg["objective"]["grpo"]["skip_zero_advantage"] = skip
        cfg["train"]["max_steps"] = 2
        cfg["checkpoint"] = {"every_steps": None}
        path.write_text(yaml.safe_dump(cfg))
        r = cli(str(path), "--nproc", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / f"skip-{skip}" / "metrics.jsonl").read_text().splitlines()]
        runs[skip] = [x for x in lines if x["type"] == "train"], adapter(tmp_path / f"skip-{skip}")
    (skipped, a), (full, b) = runs[True], runs[False]
    assert [m["groups_all_equal"] for m in skipped] == [m["groups_all_equal"] for m in full]
    assert all(m["groups_all_equal"] >= 0.5 for m in skipped)  # process 0's half, at least
    assert all(m["trained_tokens"] < f["trained_tokens"] for m, f in zip(skipped, full))
    for m, f in zip(skipped, full):
        assert m["reward"] == f["reward"] and m["loss"] == pytest.approx(f["loss"], rel=1e-5, abs=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4, msg=k)
