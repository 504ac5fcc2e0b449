"""Optional packages a config needs on the machine that runs it.

Whether a config is valid does not depend on the machine: the schema never looks at what is installed.
`tuneforge validate` lists what this machine lacks as a separate finding; `tuneforge train` refuses to start
without it, before loading data or a model (`require_packages`)."""

from __future__ import annotations

import importlib.util

from tuneforge.config.load import ConfigError
from tuneforge.config.schema import TRACKER_PACKAGES, RunConfig


class MissingPackageError(ConfigError):
    """The config is valid but needs packages this machine does not have; the message names what to install."""


def missing_packages(cfg: RunConfig) -> list[str]:
    """One line per optional package the run needs and this Python environment cannot import."""
    needs: list[tuple[str, str, str]] = []  # (module, what to pip install, the keys that need it)
    for name in cfg.log.report_to:
        if name != "jsonl":
            module, pip_name = TRACKER_PACKAGES[name]
            needs.append((module, pip_name, f"log.report_to includes {name!r}"))
    bnb = [
        what
        for what, used in (
            ("adapter.type=qlora", cfg.adapter.type == "qlora"),
            (f"train.optimizer={cfg.train.optimizer}", cfg.train.optimizer != "adamw"),
        )
        if used
    ]
    if bnb:
        needs.append(("bitsandbytes", "tuneforge[qlora]", " and ".join(bnb)))
    if cfg.dist.strategy == "deepspeed":
        needs.append(("deepspeed", "tuneforge[deepspeed]", "dist.strategy=deepspeed"))
    # train.liger_kernels is checked when the device is known (model/kernels.py: CUDA only, then the package)
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.append(("flash_attn", "flash-attn", "model.attn_implementation=flash_attention_2"))
    return [
        f"{keys} needs the {module} package, which is not installed: pip install '{pip_name}'"
        for module, pip_name, keys in needs
        if importlib.util.find_spec(module) is None
    ]


def require_packages(cfg: RunConfig) -> None:
    """Raise MissingPackageError (exit 2) naming every missing package and its install command."""
    missing = missing_packages(cfg)
    if missing:
        raise MissingPackageError(
            "this run cannot start on this machine:\n  "
            + "\n  ".join(missing)
            + "\n(or change those keys; `tuneforge validate CONFIG` lists what is missing)"
        )
