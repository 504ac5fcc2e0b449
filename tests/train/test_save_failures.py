"""A full disk never kills a run: every checkpoint writer's error is reported (whatever log.progress is), counted,
and the previous checkpoint kept; a final/ that cannot be written names the last good checkpoint; low free space
is warned about before it bites; re-running a finished run says it is complete (issue 21, items 1, 9, 10)."""

import errno
import json
import shutil
import subprocess
from collections import namedtuple

import pytest
import torch
import yaml
from safetensors import SafetensorError

import tuneforge.train.checkpoint as checkpoint
import tuneforge.train.disk_space as disk_space
import tuneforge.train.loop as loop
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import prepare
from tuneforge.train.alerts import end_of_run_warnings
from tuneforge.train.checkpoint import MANIFEST, find_latest, load_checkpoint
from tuneforge.train.loop import Trainer

TORCH_ENFORCE = (
    "[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366\nframe #0: c10::ThrowEnforceNotMet(...)"
)
SAFETENSORS_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def trainer_for(cfg_dict, tmp_path, **sections):
    d = {**cfg_dict, "output": {"dir": str(tmp_path / "run")}}
    for sec, vals in sections.items():
        d[sec] = {**d.get(sec, {}), **vals}
    cfg = RunConfig.model_validate(d)
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    return Trainer(cfg, tmp_path / "run", data, None, log=lambda s: None).setup()


def fail_second_call(monkeypatch, owner, attr, error, when=lambda path: True, path_arg=1):
    """Replace owner.attr by a writer that, on its second matching call, writes a few bytes (a half-written file)
    and raises `error`, as a disk that fills up mid-save does. `path_arg`: where the writer takes the file's path."""
    real, calls = getattr(owner, attr), {"n": 0}

    def writer(*a, **k):
        path = a[path_arg]
        if when(path):
            calls["n"] += 1
            if calls["n"] == 2:
                with open(path, "wb") as f:
                    f.write(b"\0" * 100)
                raise error
        return real(*a, **k)

    monkeypatch.setattr(owner, attr, writer)


WRITER_ERRORS = {
    # safetensors' writer of trainable.safetensors
    "safetensors": lambda mp: fail_second_call(mp, checkpoint, "save_file", SafetensorError(SAFETENSORS_FULL)),
    # torch.save of optimizer.pt, after the weights were written
    "torch": lambda mp: fail_second_call(
        mp, torch, "save", RuntimeError(TORCH_ENFORCE), when=lambda path: str(path).endswith("optimizer.pt")
    ),
    # the manifest, the last file before the rename
    "oserror": lambda mp: fail_second_call(
        mp,
        checkpoint,
        "write_json",
        OSError(errno.ENOSPC, "No space left on device"),
        when=lambda path: str(path).endswith(MANIFEST),
        path_arg=0,
    ),
}
EXPECTED = {
    "safetensors": "SafetensorError: Error while serializing: IoError(Os { code: 28",
    "torch": "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366)",
    "oserror": "OSError: [Errno 28] No space left on device",
}


def assert_step2_is_latest_and_loads(tr):
    latest = find_latest(tr.ckpt_root)
    assert latest.name == "step-000002"
    assert not [p.name for p in tr.ckpt_root.iterdir() if p.name.startswith((".tmp-", ".old-", "latest.tmp"))]
    saved = checkpoint.load_file(str(latest / "trainable.safetensors"))
    state = load_checkpoint(
        latest, model=tr.parallel.module(), optimizer=tr.optimizer, scheduler=tr.scheduler, scaler=None
    )
    assert state.step == 2 and tr.scheduler.state_dict()["last_epoch"] == 2
    for n, p in tr.parallel.module().named_parameters():
        assert torch.equal(p.detach(), saved[n]), n


@pytest.mark.parametrize("writer", sorted(WRITER_ERRORS))
def test_a_writer_failing_mid_save_is_reported_counted_and_the_run_goes_on(
    tiny_config_dict, tmp_path, monkeypatch, capsys, writer
):
    tr = trainer_for(tiny_config_dict, tmp_path, checkpoint={"every_steps": 2}, log={"progress": "none"})
    WRITER_ERRORS[writer](monkeypatch)
    summary = tr.train()
    tr.cleanup()
    monkeypatch.undo()
    assert summary["steps"] == 4 and summary["failed_checkpoint_saves"] == 1
    assert summary["last_checkpoint"].endswith("step-000002")
    assert_step2_is_latest_and_loads(tr)
    err = capsys.readouterr().err
    assert f"warning: checkpoint at step 4 could not be written ({EXPECTED[writer]}" in err
    assert "step-000002 is intact" in err and "Training goes on (1 failed save so far)" in err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "checkpoint_failed"] == [4]


def test_a_real_full_disk_mid_save(tiny_config_dict, tmp_path, capsys):
    """The checkpoint directory on a tmpfs with room for one checkpoint and a half (needs root to mount)."""
    tr = trainer_for(tiny_config_dict, tmp_path, checkpoint={"every_steps": 2, "save_total_limit": 1})
    tr.ckpt_root.mkdir(parents=True, exist_ok=True)
    size = int(1.5 * tr.checkpoints.need_bytes)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(tr.ckpt_root)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        tr.cleanup()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()[:100]})")
    try:
        summary = tr.train()
        tr.cleanup()
        assert summary["steps"] == 4 and summary["failed_checkpoint_saves"] == 1
        assert_step2_is_latest_and_loads(tr)
    finally:
        unmounted = subprocess.run(["umount", str(tr.ckpt_root)], capture_output=True, text=True)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(tr.ckpt_root)])
    # "target is busy": a failed writer left a file open, holding the full disk's space
    assert unmounted.returncode == 0, unmounted.stderr
    err = capsys.readouterr().err
    assert "warning: checkpoint at step 4 could not be written (" in err and "step-000002 is intact" in err
    # after the first checkpoint, its real size says the next one will not fit
    assert "and a checkpoint needs about" in err and "(the size of the last one written)" in err


Usage = namedtuple("Usage", "total used free")


def test_low_free_space_is_warned_before_the_first_checkpoint_from_an_estimate(
    tiny_config_dict, tmp_path, monkeypatch, capsys
):
    tr = trainer_for(tiny_config_dict, tmp_path, checkpoint={"every_steps": 1})
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    estimate = tr.checkpoints.need_bytes
    tr.train()
    tr.cleanup()
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("warning: only 0.0 MB free on the file system of") == 1  # once, not at every save
    assert f"{tr.ckpt_root}, and a checkpoint needs about {estimate / 1e6:.1f} MB (estimated: trainable" in err
    assert "lower checkpoint.save_total_limit, or set output.dir to a larger disk" in err
    # the estimate is the real size within 20%
    real = disk_space.directory_bytes(find_latest(tr.ckpt_root))
    assert 0.8 < estimate / real < 1.25, (estimate, real)


def test_low_free_space_is_warned_with_the_real_size_once_a_checkpoint_exists(
    tiny_config_dict, tmp_path, monkeypatch, capsys
):
    tr = trainer_for(tiny_config_dict, tmp_path, checkpoint={"every_steps": 1})

    def usage(path):  # plenty until the first checkpoint is written, then less than one
        return Usage(10**12, 0, 10**12 if find_latest(tr.ckpt_root) is None else 10_000)

    monkeypatch.setattr(disk_space.shutil, "disk_usage", usage)
    tr.train()
    tr.cleanup()
    monkeypatch.undo()
    real = disk_space.directory_bytes(find_latest(tr.ckpt_root))  # every checkpoint of this run has its size
    err = capsys.readouterr().err
    assert err.count("warning: only") == 1
    assert (
        f"warning: only 0.0 MB free on the file system of {tr.ckpt_root}, and a checkpoint needs about "
        f"{real / 1e6:.1f} MB (the size of the last one written)" in err
    )


def test_the_summary_counts_skipped_rows_steps_and_failed_saves(tiny_config_dict, tmp_path, monkeypatch):
    tr = trainer_for(tiny_config_dict, tmp_path)
    tr.data.report["invalid"] = {**tr.data.report.get("invalid", {}), "skipped": 3}
    summary = tr.train()
    tr.cleanup()
    assert summary["skipped_rows"] == 3 and summary["failed_checkpoint_saves"] == 0 and summary["bad_steps"] == 0
    lines = end_of_run_warnings({**summary, "bad_steps": 2, "failed_checkpoint_saves": 1}, tmp_path / "run")
    assert lines == [
        f'warning: 1 checkpoint save failed ("checkpoint_failed" in {tmp_path}/run/metrics.jsonl); the last good '
        f"checkpoint is {tmp_path}/run/checkpoints/step-000004",
        f'warning: 2 steps skipped: a non-finite loss or gradient, no weight update ("bad_step" in '
        f"{tmp_path}/run/metrics.jsonl)",
        f"warning: 3 data rows skipped as invalid (data.skip_invalid; the reasons are in "
        f"{tmp_path}/run/data/data_report.json)",
    ]
    assert end_of_run_warnings({"bad_steps": 0, "failed_checkpoint_saves": 0, "skipped_rows": 0}, tmp_path) == []


def nan_at_step(monkeypatch, bad_step):
    calls, real = {"n": 0}, loop.trained_nll_sum

    def nll(model, batch, **kw):
        calls["n"] += 1
        out = real(model, batch, **kw)
        return out * float("nan") if calls["n"] == bad_step else out

    monkeypatch.setattr(loop, "trained_nll_sum", nll)


def test_cli_a_failed_final_names_the_last_good_checkpoint_and_a_finished_run_says_it_is_complete(
    tiny_config_dict, tmp_path, monkeypatch, capsys
):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny_config_dict, "checkpoint": {"every_steps": 2}}))
    run = tmp_path / "run"

    # 1. the step-4 checkpoint fails, step 3 is non-finite: the run finishes and its summary says both
    fail_second_call(monkeypatch, checkpoint, "save_file", SafetensorError(SAFETENSORS_FULL))
    nan_at_step(monkeypatch, 3)
    assert main(["train", str(path)]) == 0
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "warning: checkpoint at step 4 could not be written (SafetensorError: " in err
    assert (
        f'warning: 1 checkpoint save failed ("checkpoint_failed" in {run}/metrics.jsonl); the last good '
        f"checkpoint is {run}/checkpoints/step-000002" in err
    )
    assert "warning: 1 step skipped: a non-finite loss or gradient" in err
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["failed_checkpoint_saves"] == 1 and summary["bad_steps"] == 1
    assert summary["last_checkpoint"] == str(run / "checkpoints" / "step-000002")

    # 2. the same command again: complete, nothing to do, exit 0
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is already complete: 4 steps trained, the weights are in {run}/final" in out
    assert "To train again: choose a new output.dir; or start over here with output.overwrite=true" in out

    # 3. a changed config would change nothing: exit 2, naming the change
    assert main(["train", str(path), "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{run}/final already exists: the run in {run} is complete (4 steps), trained with another config "
        "(train.max_steps: 4 -> 6)"
        in err
        and f"delete {run}/final (the checkpoints stay)" in err
    )

    # 4. final/ cannot be written: exit 1, naming the last good checkpoint and the command that resumes from it
    shutil.rmtree(run / "final")

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "write_final", disk_full)
    assert main(["train", str(path)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert (
        f"error: the final weights could not be written to {run}/final (OSError: [Errno 28] No space left on "
        f"device); the last good checkpoint is {run}/checkpoints/step-000004: free space on {run} and run the "
        "same `tuneforge train` command again" in err
    )
    assert f"the command: tuneforge train {path}" in err and "Traceback" not in err
    assert not (run / "final").exists() and not (run / "final.tmp").exists()

    # 5. ... and that command does it
    assert main(["train", str(path)]) == 0
    assert (run / "final" / "tuneforge.json").exists()
    assert "resuming from" in capsys.readouterr().out
