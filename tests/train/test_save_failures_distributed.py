"""A checkpoint that one rank of several cannot write: every rank gives it up together and training goes on
(no rank left waiting for another at a barrier, no crash), with the previous checkpoint kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.integration

# loaded by every process of the job (PYTHONPATH): rank 1's second RNG file hits a full disk, as torch.save reports it
FAIL_ON_RANK1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        if str(f).endswith("rng-rank1.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **k)

    torch.save = save
"""


def test_a_save_one_rank_cannot_write_is_given_up_by_all_and_the_run_goes_on(tmp_path, tiny_config_dict):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK1)
    run = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **tiny_config_dict,
                "train": {**tiny_config_dict["train"], "max_steps": 6},
                "checkpoint": {"every_steps": 2},
                "output": {"dir": str(run)},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert (
        "rank 1: warning: checkpoint at step 4 could not be written (RuntimeError: [enforce fail at "
        "inline_container.cc:672] . unexpected pos 64 vs 0)" in err
    )
    assert "warning: checkpoint at step 4 could not be written (CheckpointError: " in err
    assert "another process could not write its part of checkpoint step-000004" in err
    assert "the previous checkpoint " + str(run / "checkpoints" / "step-000002") + " is intact" in err
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000002", "step-000006"]
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 6 and summary["failed_checkpoint_saves"] == 1
    failed = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "checkpoint_failed"
    ]
    assert failed == [4]
