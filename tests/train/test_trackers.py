"""Each tracker's output read back with that tracker's own reader, after the Monitor fanned records out to it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tuneforge.config.load import ConfigError, load_config
from tuneforge.config.schema import LogConfig
from tuneforge.progress import TaskProgress
from tuneforge.train.monitor import Monitor
from tuneforge.train.trackers import open_trackers, record_metrics

CONFIG = {"train.lr": 0.001, "adapter.type": "lora", "data.train": [{"synthetic": "x"}], "eval.every_steps": None}
STEPS = [(1, 2.5, 1e-3), (2, 2.0, 9e-4), (3, 1.75, 8e-4)]


def run_monitor(run_dir: Path, report_to: list[str], **log) -> None:
    """Three logged train steps and an eval, as the training loop sends them."""
    cfg = LogConfig(report_to=report_to, run_name="tiny", **log)
    trackers = open_trackers(cfg, run_dir, CONFIG)
    mon = Monitor(run_dir, total_steps=3, every=1, progress="none", trackers=trackers)
    for step, loss, lr in STEPS:
        mon.step(step, {"loss": loss, "lr": lr, "grad_norm": 0.5, "tokens_per_s": 100.0 * step, "skipped": False})
    mon.write({"type": "eval", "step": 3, "eval_loss": 1.5, "eval_ppl": 4.4816890703380645, "eval_tokens": 40})
    mon.write({"type": "checkpoint", "step": 3, "path": "x"})  # not a metric record: trackers skip it
    mon.close()


def test_record_metrics_namespaces_numbers_and_skips_the_rest():
    assert record_metrics({"type": "train", "step": 4, "loss": 1.0, "skipped": False, "note": "x", "tokens": 7}) == (
        {"train/loss": 1.0, "train/tokens": 7.0},
        4,
    )
    assert record_metrics({"type": "eval", "step": 0, "eval_loss": 2.0, "exact_match": 0.5}) == (
        {"eval/loss": 2.0, "eval/exact_match": 0.5},
        0,
    )
    assert record_metrics({"type": "checkpoint", "step": 3, "path": "p"}) is None


def test_tensorboard_event_file_read_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_monitor(tmp_path, ["jsonl", "tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0), (3, 1.75)]
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3]
    assert acc.Scalars("train/lr")[1].value == pytest.approx(9e-4)
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(3, 1.5)]
    assert acc.Scalars("eval/ppl")[0].value == pytest.approx(4.4816890703380645)
    assert "train/skipped" not in acc.Tags()["scalars"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    train.lr: 0.001" in config_text and "    eval.every_steps: null" in config_text
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["train.lr"].number_value == 0.001
    assert info.hparams["adapter.type"].string_value == "lora"
    assert info.hparams["data.train"].string_value == '[{"synthetic": "x"}]'


def test_mlflow_local_store_read_by_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow
    from mlflow.tracking import MlflowClient

    run_monitor(tmp_path, ["mlflow"], project="tf-test")
    uri = (tmp_path / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tf-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"] == run.info.run_id
    assert run.data.params["train.lr"] == "0.001" and run.data.params["adapter.type"] == "lora"
    assert run.data.params["eval.every_steps"] == "null"
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0), (3, 1.75)]
    assert run.data.metrics["eval/loss"] == 1.5 and run.data.metrics["train/tokens_per_s"] == 300.0

    # a resumed run continues the same MLflow run instead of starting another
    cfg = LogConfig(report_to=["mlflow"], run_name="tiny", project="tf-test")
    trackers = open_trackers(cfg, tmp_path, CONFIG, resume=True)
    Monitor(tmp_path, 4, 1, "none", trackers=trackers).step(4, {"loss": 1.25})
    trackers[0].close()
    assert len(mlflow.search_runs(experiment_names=["tf-test"], output_format="list")) == 1
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


def read_wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (.wandb): a LevelDB-style log of 32 KiB blocks after a 7-byte header,
    each chunk `crc32 (4) | length (2) | type (1)` and a slice of a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: skip to the next block
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def test_wandb_offline_run_directory_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_monitor(tmp_path, ["wandb"], project="tf-test")
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1, list((tmp_path / "wandb").iterdir())
    records = read_wandb_records(run_dirs[0] / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tf-test" and run.display_name == "tiny" and run.run_id == run_id
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert (
        config["train.lr"] == 0.001
        and config["adapter.type"] == "lora"
        and config["data.train"] == '[{"synthetic": "x"}]'
    )
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.append((r.history.step.num, item.get("train/loss"), item.get("eval/loss")))
    assert history == [(1, 2.5, None), (2, 2.0, None), (3, 1.75, 1.5)]


def test_missing_tracker_package_is_a_finding_of_validate_and_train_refuses_to_start(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tuneforge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {init: {}}\ndata: {train: [{synthetic: {task: reverse_words}}]}\n"
        f"log: {{report_to: [jsonl, wandb]}}\noutput: {{dir: {tmp_path / 'run'}}}\n"
    )
    load_config(path)  # the config is valid on any machine
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith(
        "missing on this machine (train will not start until they are installed):\n  "
        "log.report_to includes 'wandb' needs the wandb package, which is not installed: "
        "pip install 'tuneforge[wandb]'\n"
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "this run cannot start on this machine:" in err and "pip install 'tuneforge[wandb]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


def test_unknown_tracker_name_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {init: {}}\ndata: {train: [{synthetic: {task: reverse_words}}]}\nlog: {report_to: [neptune]}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "log.report_to" in str(e.value) and "'tensorboard'" in str(e.value)


def test_json_progress_mode_prints_each_record_as_a_json_line(tmp_path, capsys):
    mon = Monitor(tmp_path, total_steps=2, every=1, progress="json")
    mon.step(1, {"loss": 2.0})
    mon.event("hello")
    mon.close()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["type"], x.get("step"), x.get("loss"), x.get("text")) for x in lines] == [
        ("train", 1, 2.0, None),
        ("event", None, None, "hello"),
    ]

    bar = TaskProgress("eval", 4, "json")
    for _ in range(4):
        bar.advance()
    progress = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(p["task"], p["done"], p["total"]) for p in progress] == [
        ("eval", 1, 4),
        ("eval", 2, 4),
        ("eval", 3, 4),
        ("eval", 4, 4),
    ]


@pytest.mark.integration
def test_training_run_sends_its_metrics_and_config_to_tensorboard(tmp_path, tiny_config_dict):
    pytest.importorskip("tensorboard")
    import subprocess
    import sys

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dict(tiny_config_dict)
    cfg["log"] = {"every_steps": 1, "progress": "none", "report_to": ["jsonl", "tensorboard"]}
    cfg["eval"] = {"at_start": True, "show_samples": 0}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "train", str(path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(cfg["output"]["dir"])
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"type": "train"' in x]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train
    ]
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 4]
    assert {
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/trained_tokens",
        "train/step_time_s",
        "train/peak_mem_gb",
        "eval/ppl",
    } <= set(acc.Tags()["scalars"])
