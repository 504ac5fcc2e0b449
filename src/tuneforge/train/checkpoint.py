"""Atomic checkpoints and exact resume.

A checkpoint is a directory `<run>/checkpoints/step-XXXXXX/` holding everything the loop needs to
continue as if it had never stopped:

  trainable.safetensors   the trainable parameters by name (adapter weights, or every weight in full FT)
  optimizer.pt            optimizer state;  scheduler.pt  schedule state;  scaler.pt  fp16 loss scaler
  sharded/                instead of the two above under FSDP2 / DeepSpeed: each rank's shards of the trainable
                          weights and optimizer state (torch.distributed.checkpoint, or DeepSpeed's ZeRO files)
  rng-rank{R}.pt          python, numpy, torch CPU and CUDA generator states of rank R
  state.json              TrainState: step, token counters, bad steps, failed saves, best-eval, early-stop
  manifest.json           step, tokens, last eval, what the run must not change to resume, library versions

It is written into `.tmp-step-XXXXXX/`, every file fsynced, `manifest.json` last, then renamed into
place; `checkpoints/latest` (a one-line file naming the directory) is replaced after the rename. A
crash at any moment leaves `latest` naming a complete checkpoint (or none), and a directory without a
manifest is never resumed from. The data position is the step number: `BatchOrder` computes any
micro-batch in O(1), so nothing is replayed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuneforge import __version__
from tuneforge.errors import InputError
from tuneforge.train.durable_files import fsync_dir, fsync_file, replace_text, write_json

LATEST = "latest"
MANIFEST = "manifest.json"
# what a resumed run must share with the checkpoint; anything else (steps, logging, eval, ...) may change
RESUME_CRITICAL = (
    "model",
    "adapter",
    "data_fingerprint",
    "data_order",
    "train.group_by_length",
    "train.seed",
    "precision",
    "checkpoint_layout",
)
# written before the key existed: replicated (DDP / one process) checkpoints
RESUME_DEFAULTS = {"checkpoint_layout": "full"}
WHY_CRITICAL = {
    "model": "the checkpoint's weights belong to another model",
    "adapter": "the trainable parameters would not match",
    "data_fingerprint": "the prepared data changed, so step N would read different rows",
    "data_order": "each step would read different rows (micro_batch_size x processes x grad_accum must stay the "
    "same, and divide the rows evenly, to change how a step is split)",
    "train.group_by_length": "each step would read different rows",
    "train.seed": "the data order and dropout would differ",
    "precision": "the numbers would differ from the run that wrote it",
    "checkpoint_layout": "the checkpoint's weights and optimizer state are stored for another dist.strategy (DeepSpeed "
    "ZeRO partitions also for one world size and stage); resume with the strategy that wrote it",
}


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be written or resumed from; the message says why and what to do."""


@dataclasses.dataclass
class TrainState:
    """Counters and bookkeeping the loop carries from step to step (saved as state.json)."""

    step: int = 0
    tokens_total: int = 0
    trained_tokens_total: int = 0
    bad_steps: int = 0
    failed_saves: int = 0  # checkpoints that could not be written (disk full, read-only, ...); the run went on
    first_loss: float | None = None
    last_loss: float | None = None
    loss_avg: float | None = None  # running average for loss-spike detection
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval: dict = dataclasses.field(default_factory=dict)
    train_seconds: float = 0.0
    stopped_early: bool = False


def _reached(stage: str) -> None:
    """Called between the stages of a save. A seam for tests that crash or fail a save at a given stage."""


# ---------------------------------------------------------------------------- what is saved
def rng_state() -> dict:
    """Every random stream, as tensors and plain data (numpy's key as a tensor), so it loads with weights_only."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"{where}: trainable parameters do not match the model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "the checkpoint was written for another model or adapter"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise CheckpointError(
                    f"{where}: {n} has shape {tuple(tensors[n].shape)}, the model has {tuple(p.shape)}"
                )
            p.copy_(tensors[n].to(p.device, p.dtype))


def load_weights_only(path: Path, model: torch.nn.Module, load_shards=None) -> bool:
    """The trained weights of checkpoint `path` into `model` (no optimizer, schedule or counters), from its
    trainable.safetensors or, for sharded strategies, its `sharded/` folder via `load_shards`; False when missing."""
    sharded = load_shards is not None
    if not (path / ("sharded" if sharded else "trainable.safetensors")).exists():
        return False
    if sharded:
        load_shards(path / "sharded", True)
    else:
        load_trainable_state(model, load_file(str(path / "trainable.safetensors")), path)
    return True


def library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "tuneforge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------- save
def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    state: TrainState,
    resume_key: dict,
    is_main: bool = True,
    rank: int = 0,
    barrier=lambda: None,
    shards=None,
    any_failed=None,
) -> Path:
    """Write checkpoint `step` atomically; returns its directory. When a writer fails (any error: disk full,
    read-only, quota; torch.save's RuntimeError, safetensors' SafetensorError, OSError), the partial `.tmp-*` is
    removed, the previous checkpoints and `latest` are untouched, and the error is raised (CheckpointError on a
    process whose own part succeeded). `any_failed(failed_here) -> failed_anywhere`, a collective given by
    multi-process runs, lets every rank give up together instead of one waiting for another at a barrier.
    `shards(dir)`, when given, is called on every rank to write the sharded weights and optimizer state."""
    ckpt_root = Path(ckpt_root)
    name = step_dir_name(step)
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    failure: Exception | None = None

    def part(write) -> None:  # this rank's share of one stage; skipped once something failed here
        nonlocal failure
        if failure is None:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - any writer's error; KeyboardInterrupt and SystemExit pass through
                failure = e

    def settle() -> None:  # the barrier between stages: every rank learns whether any failed, and all stop together
        if any_failed is not None:
            failed = any_failed(failure is not None)
        else:
            barrier()
            failed = failure is not None
        if failed:
            raise (
                failure
                if failure is not None
                else CheckpointError(f"{tmp}: another process could not write its part of checkpoint {name}")
            )

    def start() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def own_files() -> None:
        _reached("start")
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        fsync_file(tmp / f"rng-rank{rank}.pt")

    def sharded() -> None:  # a collective: every rank takes part, even one whose own files failed
        shards(tmp / "sharded")
        _reached("weights")
        for f in sorted((tmp / "sharded").rglob("*")):
            if f.is_file():
                fsync_file(f)

    def main_files() -> None:
        if shards is None:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            fsync_file(tmp / "trainable.safetensors")
            _reached("weights")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            fsync_file(tmp / "optimizer.pt")
            _reached("optimizer")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        fsync_file(tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
            fsync_file(tmp / "scaler.pt")
        write_json(tmp / "state.json", dataclasses.asdict(state))

    def publish() -> None:
        _reached("manifest")
        write_json(
            tmp / MANIFEST,
            {
                "step": step,
                "tokens_seen": state.tokens_total,
                "trained_tokens": state.trained_tokens_total,
                "eval": state.last_eval,
                "resume_key": resume_key,
                "versions": library_versions(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        fsync_dir(tmp)
        _reached("rename")
        if final.exists():  # the same step saved again (e.g. a stop right after a scheduled save)
            old = ckpt_root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(ckpt_root)
        _reached("latest")
        replace_text(ckpt_root / LATEST, name + "\n")

    try:
        if is_main:
            part(start)
        settle()
        if shards is not None:
            try:
                sharded()
            except Exception as e:  # noqa: BLE001 - as in part(), but entered by every rank
                failure = failure or e
        part(own_files)
        if is_main:
            part(main_files)
        settle()
        if is_main:
            part(publish)
        settle()
    except BaseException:
        failure = None  # the frame -> failure -> traceback -> frame cycle would keep a failed writer's file open
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(ckpt_root: Path, keep_last: int, keep: set[int] = frozenset()) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except the steps in `keep`."""
    done = complete_checkpoints(ckpt_root)
    removed = []
    for step, path in done[:-keep_last] if keep_last else done:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------- find and load
def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint with a manifest, oldest first."""
    out = []
    if not Path(ckpt_root).is_dir():
        return out
    for p in Path(ckpt_root).iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST).is_file():
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def find_latest(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        named = ckpt_root / pointer.read_text(encoding="utf-8").strip()
        if (named / MANIFEST).is_file():
            return named
    done = complete_checkpoints(ckpt_root)
    return done[-1][1] if done else None


def clean_partial(ckpt_root: Path) -> None:
    """Remove what an interrupted save left behind (temporary directories)."""
    if Path(ckpt_root).is_dir():
        for p in Path(ckpt_root).iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} is not a complete tuneforge checkpoint (no {MANIFEST}); "
            f"pick a step-XXXXXX directory under <run>/checkpoints"
        )
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def check_resume_key(path: Path, saved: dict, current: dict) -> list[str]:
    """Raise CheckpointError naming each setting that changed and forbids resuming; return the allowed changes."""
    bad = []
    for key in RESUME_CRITICAL:
        old, new = saved.get(key, RESUME_DEFAULTS.get(key)), current.get(key, RESUME_DEFAULTS.get(key))
        if old != new:
            bad.append(f"  {key}: {_short(old)} -> {_short(new)} ({WHY_CRITICAL[key]})")
    if bad:
        raise CheckpointError(
            f"cannot resume from {path}: the config changed in ways the checkpoint cannot follow:\n"
            + "\n".join(bad)
            + "\nrestore those settings to resume, or start over with --resume never and output.overwrite=true "
            "(or a new output.dir)"
        )
    old, new = saved.get("config", {}), current.get("config", {})
    return [
        f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


# numpy's array reconstruction, for RNG files written before numpy's key was saved as a tensor
_NUMPY_ARRAY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    getattr(np, "_core", np).multiarray._reconstruct,
]


def safe_load(file: Path):
    """A checkpoint file's tensors and plain data, never unpickling other objects (a crafted file could run code)."""
    import pickle

    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused to load it: it holds objects other than tensors and plain data, and unpickling them "
            f"could run code ({str(e).splitlines()[0][:200]}). tuneforge never writes such files: the checkpoint "
            "was changed by someone else. Resume from another checkpoint (--resume PATH) or start over"
        ) from None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, rank: int = 0, shards=None) -> TrainState:
    """Restore weights, optimizer, schedule, scaler and RNG from `path`; return its TrainState. `shards(dir, False)`,
    when given, loads the sharded weights and optimizer state on every rank."""
    path = Path(path)
    read_manifest(path)
    if shards is not None:
        shards(path / "sharded", False)
    else:
        load_trainable_state(model, load_file(str(path / "trainable.safetensors")), path)
        optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
    scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(safe_load(path / "scaler.pt"))
    fields = {f.name for f in dataclasses.fields(TrainState)}
    raw = json.loads((path / "state.json").read_text(encoding="utf-8"))
    state = TrainState(**{k: v for k, v in raw.items() if k in fields})
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(safe_load(rng_file))
    else:  # written by fewer processes: this rank's random stream (dropout) starts afresh, seeded by step and rank
        seed = 1_000_003 * (state.step + 1) + rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    return state


def flat_config(cfg_dump: dict, prefix: str = "") -> dict:
    """{'train.lr': 1e-3, ...} from a nested config dump."""
    out = {}
    for k, v in cfg_dump.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
