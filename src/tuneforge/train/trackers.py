"""Metric trackers the Monitor fans records out to: TensorBoard, MLflow, W&B, and accelerate's others.

metrics.jsonl is written by the Monitor itself and is always on; these are extra sinks chosen by
`log.report_to`. Each tracker is a small class with the same three calls:

    log_config(flat)        the resolved config as params / hparams, once at the start
    log(metrics, step)      numeric metrics, names like "train/loss", "eval/ppl"
    close()                 flush and finish

Everything runs offline by default: TensorBoard and MLflow write under the run directory, W&B runs
in offline mode (upload later with `wandb sync`). A resumed run continues the same MLflow / W&B run:
their ids are kept in <run>/trackers.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from tuneforge.config.schema import TRACKER_PACKAGES, LogConfig
from tuneforge.errors import TuneforgeError


class TrackerError(TuneforgeError, RuntimeError):
    """A tracker could not be started; the message names the tracker and the fix."""


class Tracker(Protocol):
    name: str

    def log_config(self, flat: dict) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def _require(name: str) -> None:
    import importlib.util

    module, pip_name = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise TrackerError(
            f"log.report_to includes {name!r} but {module} is not installed; "
            f"pip install '{pip_name}' or remove {name} from log.report_to"
        )


def _param_value(v) -> str | int | float | bool:
    """Trackers take scalars; lists and None become their JSON text."""
    return v if isinstance(v, (str, int, float, bool)) else json.dumps(v)


# ---------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker:
    """Event files in <run>/tensorboard, readable by `tensorboard --logdir <run>/tensorboard`."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, flat: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {k: _param_value(v) for k, v in flat.items()}
        text = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in flat.items())
        self.writer.add_text("config", text, global_step=0)
        # hparams in this run's own event file (add_hparams would start a separate sub-run)
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


# ---------------------------------------------------------------------------- MLflow
class MlflowTracker:
    """An MLflow run; by default in a local file store at <run>/mlruns (`mlflow ui --backend-store-uri ...`)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None):
        _require("mlflow")
        if tracking_uri.startswith("file:"):
            # MLflow 3 refuses a file store unless told it is wanted; a local store is the point here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            self.run_id = run_id
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_config(self, flat: dict) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters and rejects re-logging a changed value on resume
        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(_param_value(v))[:6000]) for k, v in flat.items() if k not in have]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# ---------------------------------------------------------------------------- Weights & Biases
class WandbTracker:
    """A W&B run in <run>/wandb; offline by default (no network, no login), `wandb sync` uploads it later."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, mode: str, run_id: str | None = None):
        _require("wandb")
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id

    def log_config(self, flat: dict) -> None:
        self.run.config.update({k: _param_value(v) for k, v in flat.items()}, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


# ---------------------------------------------------------------------------- the others, via accelerate
class AccelerateTracker:
    """Any other tracker accelerate integrates (aim, comet_ml, clearml, dvclive, swanlab, trackio)."""

    def __init__(self, name: str, run_dir: Path, run_name: str):
        _require(name)
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.name = name
        cls = LOGGER_TYPE_TO_CLASS[name]
        self.tracker = cls(run_name, str(run_dir / name)) if cls.requires_logging_directory else cls(run_name)
        if hasattr(self.tracker, "start"):
            self.tracker.start()

    def log_config(self, flat: dict) -> None:
        self.tracker.store_init_configuration({k: _param_value(v) for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log(dict(metrics), step=step)

    def close(self) -> None:
        self.tracker.finish()


# ---------------------------------------------------------------------------- opening them
def open_trackers(cfg: LogConfig, run_dir: str | Path, flat_config: dict, resume: bool = False) -> list[Tracker]:
    """Start the trackers `cfg.report_to` names (jsonl is the Monitor's own) and log the config to each.

    `resume=True` continues the MLflow / W&B runs recorded in <run>/trackers.json; otherwise new runs start.
    """
    run_dir = Path(run_dir)
    ids_file = run_dir / "trackers.json"
    ids = json.loads(ids_file.read_text()) if resume and ids_file.exists() else {}
    run_name = cfg.run_name or run_dir.resolve().name
    trackers: list[Tracker] = []
    try:
        for name in dict.fromkeys(cfg.report_to):  # each once, in order
            if name == "jsonl":
                continue
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
            elif name == "mlflow":
                uri = (
                    cfg.mlflow_tracking_uri
                    or os.environ.get("MLFLOW_TRACKING_URI")
                    or (run_dir / "mlruns").resolve().as_uri()
                )
                trackers.append(MlflowTracker(uri, cfg.project, run_name, ids.get("mlflow")))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, cfg.project, run_name, cfg.wandb_mode, ids.get("wandb")))
            else:
                trackers.append(AccelerateTracker(name, run_dir, run_name))
        for t in trackers:
            t.log_config(flat_config)
    except BaseException:
        for t in trackers:
            t.close()
        raise
    new_ids = {t.name: t.run_id for t in trackers if hasattr(t, "run_id")}
    if new_ids:
        ids_file.write_text(json.dumps(new_ids, indent=2))
    return trackers


def record_metrics(record: dict) -> tuple[dict[str, float], int] | None:
    """The tracker view of a metrics.jsonl record: ({"train/loss": ..., "eval/ppl": ...}, step), or None.

    Only train and eval records with a step are tracked; booleans and text are left out.
    """
    kind, step = record.get("type"), record.get("step")
    if kind not in ("train", "eval") or not isinstance(step, int):
        return None
    out = {}
    for k, v in record.items():
        if k in ("type", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        key = k.removeprefix("eval_") if kind == "eval" else k
        out[f"{kind}/{key}"] = float(v)
    return (out, step) if out else None
