"""Checkpoints in-process: atomic saves at every stage, disk errors, bad steps, early stopping, resume rules."""

import errno
import json
import math

import pytest
import torch

import tuneforge.train.checkpoint as checkpoint
import tuneforge.train.loop as loop
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import prepare
from tuneforge.train.checkpoint import (
    CheckpointError,
    TrainState,
    check_resume_key,
    clean_partial,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from tuneforge.train.loop import Trainer
from tuneforge.train.signals import BadStepsError

STAGES = ["start", "weights", "optimizer", "manifest", "rename", "latest"]


def tiny_parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def take_step(model, opt, sched):
    model(torch.ones(2, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def save(root, step, model, opt, sched):
    return save_checkpoint(
        root, step, model=model, optimizer=opt, scheduler=sched, scaler=None, state=TrainState(step=step), resume_key={}
    )


@pytest.mark.parametrize("stage", STAGES)
def test_a_save_interrupted_at_any_stage_leaves_a_loadable_latest(tmp_path, monkeypatch, stage):
    model, opt, sched = tiny_parts()
    take_step(model, opt, sched)
    save(tmp_path, 1, model, opt, sched)
    at_step1 = {k: v.clone() for k, v in model.state_dict().items()}
    take_step(model, opt, sched)

    def crash(s):
        if s == stage:
            raise RuntimeError(f"crash at {s}")

    monkeypatch.setattr(checkpoint, "_reached", crash)
    with pytest.raises(RuntimeError, match=f"crash at {stage}"):
        save(tmp_path, 2, model, opt, sched)
    monkeypatch.setattr(checkpoint, "_reached", lambda s: None)

    latest = find_latest(tmp_path)
    # before the rename the new checkpoint does not exist; after it, `latest` still names the old one
    assert latest.name == "step-000001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    fresh, fopt, fsched = tiny_parts(seed=5)
    state = load_checkpoint(latest, model=fresh, optimizer=fopt, scheduler=fsched, scaler=None)
    assert state.step == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_step1[k])
    assert fsched.last_epoch == 1


def test_a_killed_save_leaves_a_partial_directory_that_is_ignored_and_cleaned(tmp_path):
    model, opt, sched = tiny_parts()
    save(tmp_path, 1, model, opt, sched)
    (tmp_path / ".tmp-step-000002").mkdir()
    (tmp_path / ".tmp-step-000002" / "trainable.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "step-000003").mkdir()  # a directory without manifest is never resumed from
    (tmp_path / "latest").write_text("step-000003\n")
    assert find_latest(tmp_path).name == "step-000001"
    clean_partial(tmp_path)
    assert not (tmp_path / ".tmp-step-000002").exists()


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    model, opt, sched = tiny_parts()
    for step in range(1, 6):
        save(tmp_path, step, model, opt, sched)
    checkpoint.prune(tmp_path, keep_last=2, keep={2})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-000002", "step-000004", "step-000005"]


def test_resume_key_refuses_critical_changes_and_lists_allowed_ones():
    order = {"rows": 64, "rows_per_step": 8, "global_micro_batch": None}
    saved = {
        "model": {"a": 1},
        "adapter": {"r": 8},
        "data_fingerprint": "f1",
        "data_order": order,
        "train.group_by_length": False,
        "world_size": 1,
        "train.seed": 1,
        "precision": "fp32",
        "config": {"train.max_steps": 10, "log.every_steps": 1, "train.micro_batch_size": 4},
    }
    allowed = {
        **saved,
        "world_size": 2,
        "config": {**saved["config"], "train.max_steps": 20, "log.every_steps": 5, "train.micro_batch_size": 2},
    }
    assert check_resume_key("ck", saved, allowed) == [
        "log.every_steps: 1 -> 5",
        "train.max_steps: 10 -> 20",
        "train.micro_batch_size: 4 -> 2",
    ]
    with pytest.raises(CheckpointError) as e:
        check_resume_key("ck", saved, {**saved, "data_order": {**order, "rows_per_step": 16}, "data_fingerprint": "f2"})
    msg = str(e.value)
    assert 'data_order: {"global_micro_batch": null, "rows": 64, "rows_per_step": 8} -> ' in msg
    assert "(each step would read different rows (micro_batch_size x processes x grad_accum must stay" in msg
    assert "data_fingerprint: f1 -> f2 (the prepared data changed" in msg
    assert "--resume never and output.overwrite=true" in msg


# ---------------------------------------------------------------------------- with the real loop
def trainer_for(cfg_dict, tmp_path, evaluate=None, **sections):
    d = {**cfg_dict, "output": {"dir": str(tmp_path / "run")}}
    for sec, vals in sections.items():
        d[sec] = {**d.get(sec, {}), **vals}
    cfg = RunConfig.model_validate(d)
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    return Trainer(cfg, tmp_path / "run", data, evaluate, log=lambda s: None).setup()


def test_a_failed_save_warns_keeps_the_previous_checkpoint_and_training_goes_on(
    tiny_config_dict, tmp_path, monkeypatch, capsys
):
    tr = trainer_for(tiny_config_dict, tmp_path, checkpoint={"every_steps": 2}, log={"progress": "plain"})
    saves = {"n": 0}

    def disk_full(stage):
        if stage == "start":
            saves["n"] += 1
        if stage == "optimizer" and saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_reached", disk_full)
    summary = tr.train()
    tr.cleanup()
    assert summary["steps"] == 4
    assert find_latest(tr.ckpt_root).name == "step-000002"
    err = capsys.readouterr().err
    assert "warning: checkpoint at step 4 could not be written (OSError: [Errno 28] No space left on device)" in err
    assert "step-000002 is intact" in err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "checkpoint_failed"] == [4]


def nan_at_steps(monkeypatch, steps, grad_accum=1):
    calls = {"n": 0}
    real = loop.trained_nll_sum

    def nll(model, batch, **kw):
        calls["n"] += 1
        out = real(model, batch, **kw)
        step = (calls["n"] - 1) // grad_accum + 1
        return out * float("nan") if step in steps else out

    monkeypatch.setattr(loop, "trained_nll_sum", nll)


def test_a_nan_step_is_skipped_and_counted_without_touching_the_weights(tiny_config_dict, tmp_path, monkeypatch):
    tr = trainer_for(tiny_config_dict, tmp_path)
    nan_at_steps(monkeypatch, {2})
    m1 = tr._step(1)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m2 = tr._step(2)
    assert m2["skipped"] and math.isnan(m2["loss"]) and not m1["skipped"]
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in tr.model.parameters())
    assert not tr._step(3)["skipped"]
    tr.cleanup()


def test_too_many_bad_steps_stop_the_run_with_the_last_good_checkpoint_intact(tiny_config_dict, tmp_path, monkeypatch):
    tr = trainer_for(
        tiny_config_dict, tmp_path, train={"max_steps": 6, "max_bad_steps": 1}, checkpoint={"every_steps": 2}
    )
    nan_at_steps(monkeypatch, {3, 4})
    with pytest.raises(BadStepsError, match=r"stopped at step 4: 2 steps had a non-finite loss.*step-000002"):
        tr.train()
    tr.cleanup()
    assert find_latest(tr.ckpt_root).name == "step-000002"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["bad_steps"]) for r in records if r["type"] == "bad_step"] == [(3, 1), (4, 2)]


def scripted_eval(values):
    it = iter(values)
    return lambda model, status=None: {"eval_loss": next(it)}


def test_early_stopping_stops_at_the_expected_step_and_loads_the_best(tiny_config_dict, tmp_path):
    # evals at steps 1..: 1.0, 0.9 (best), 0.95, 0.91 -> two evals without improvement -> stop after step 4
    tr = trainer_for(
        tiny_config_dict,
        tmp_path,
        scripted_eval([1.0, 0.9, 0.95, 0.91, 0.5, 0.5]),
        train={"max_steps": 10},
        checkpoint={"every_steps": 100},
        eval={"every_steps": 1, "early_stopping_patience": 2, "load_best_at_end": True},
    )
    summary = tr.train()
    assert summary["steps"] == 4 and summary["stopped_early"] and summary["best_step"] == 2
    best = checkpoint.load_file(str(tr.ckpt_root / "step-000002" / "trainable.safetensors"))
    for n, p in tr.accelerator.unwrap_model(tr.model).named_parameters():
        assert torch.equal(p.detach(), best[n]), n
    tr.cleanup()


def test_min_delta_decides_what_counts_as_an_improvement(tiny_config_dict, tmp_path):
    tr = trainer_for(
        tiny_config_dict,
        tmp_path,
        scripted_eval([1.0, 0.99, 0.98, 0.5]),
        train={"max_steps": 4},
        checkpoint={"every_steps": 100},
        eval={"every_steps": 1, "early_stopping_patience": 2, "early_stopping_min_delta": 0.05},
    )
    summary = tr.train()
    assert summary["steps"] == 3 and summary["best_step"] == 1
    tr.cleanup()


def test_train_resumes_refuses_incompatible_changes_and_accepts_more_steps(tiny_config_dict, tmp_path, capsys):
    import yaml

    cfg = {**tiny_config_dict, "checkpoint": {"every_steps": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(path)]) == 0  # finished: the same command again says so and trains nothing
    assert "run is already complete: 4 steps trained" in capsys.readouterr().out
    import shutil

    shutil.rmtree(run / "final")  # as if it crashed after the last checkpoint
    assert main(["train", str(path), "train.micro_batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "data_order: " in err and '"rows_per_step": 4} -> ' in err
    assert main(["train", str(path), "train.max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 4 of 6" in out and "train.max_steps: 4 -> 6" in out
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert main(["train", str(path), "--resume", "never", "output.overwrite=true"]) == 0
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "train"
    ]
    assert steps == [1, 2, 3, 4]


def test_loss_spikes_are_logged(tiny_config_dict, tmp_path):
    from tuneforge.train.step_records import track_loss

    tr = trainer_for(tiny_config_dict, tmp_path, train={"loss_spike_factor": 2.0})
    for step, loss in enumerate([1.0] * 12 + [1.5, 2.5, 1.0], start=1):
        track_loss(tr.state, tr.cfg.train, tr.monitor, step, loss)
    tr.cleanup()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spikes = [(r["step"], r["loss"]) for r in records if r["type"] == "loss_spike"]
    assert spikes == [(14, 2.5)]


def test_no_loss_spikes_for_a_surrogate_loss(tiny_config_dict, tmp_path):
    """GRPO's loss sits around 0: the loop passes spikes=False and nothing is logged, the last loss still is."""
    from tuneforge.train.step_records import track_loss

    tr = trainer_for(tiny_config_dict, tmp_path, train={"loss_spike_factor": 2.0})
    for step, loss in enumerate([0.001] * 12 + [0.05, -0.02], start=1):
        track_loss(tr.state, tr.cfg.train, tr.monitor, step, loss, spikes=False)
    tr.cleanup()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["type"] == "loss_spike"] == []
    assert (tr.state.first_loss, tr.state.last_loss) == (0.001, -0.02)


class _Payload:
    """What a hostile checkpoint file holds: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["scheduler.pt", "optimizer.pt", "rng-rank0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running_it(tmp_path, name):
    model, opt, sched = tiny_parts()
    take_step(model, opt, sched)
    ckpt = save(tmp_path / "ckpts", 1, model, opt, sched)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, ckpt / name)
    model2, opt2, sched2 = tiny_parts(seed=1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2, scaler=None)
    assert not marker.exists()
    assert f"{ckpt / name}: refused to load it" in str(e.value) and "--resume PATH" in str(e.value)


def test_random_streams_round_trip_through_a_checkpoint_loaded_without_unpickling(tmp_path):
    import random

    import numpy as np

    model, opt, sched = tiny_parts()
    take_step(model, opt, sched)
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    ckpt = save(tmp_path / "ckpts", 1, model, opt, sched)
    want = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    model2, opt2, sched2 = tiny_parts(seed=1)
    load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2, scaler=None)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == want
    assert sched2.state_dict()["last_epoch"] == 1 and torch.equal(model2.weight, model.weight)
    # an RNG file of an earlier version (numpy's key as an ndarray) still loads
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        ckpt / "rng-rank0.pt",
    )
    load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2, scaler=None)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == want
