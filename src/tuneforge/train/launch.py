"""Running one config on several processes, nodes included, with PyTorch's own launcher (torchrun).

`tuneforge train CONFIG --nproc N` prepares the data once, in this process, and then starts itself N
times under `torch.distributed.run` (the elastic agent behind `torchrun`): the agent sets RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and when one rank dies it stops the others and exits, naming the
failed rank and its error — the job never hangs on a dead peer. Started by `torchrun`, `accelerate
launch` or SLURM (`srun`), tuneforge detects its rank from the environment instead and launches nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

# set by the launching `tuneforge train` for its children: the checkpoint to resume from ("" = fresh start)
RESUME_ENV = "TUNEFORGE_RESUME_FROM"


@dataclass(frozen=True)
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch (or mapped from SLURM below)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def adopt_slurm_env() -> None:
    """Under `srun` with several tasks, give each task the torch.distributed variables SLURM implies.
    MASTER_ADDR must be set by the batch script (e.g. the first host of `scontrol show hostnames`)."""
    if under_launcher() or int(os.environ.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in os.environ:
        return
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "running under SLURM with several tasks but MASTER_ADDR is not set; add to the batch "
            "script: export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)"
        )
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(spec: LaunchSpec, cli_args: list[str]) -> list[str]:
    """The `python -m torch.distributed.run ... -m tuneforge.cli <cli_args>` command for this node."""
    port = spec.master_port or (free_port() if spec.nnodes == 1 else 29500)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={spec.nproc}",
        f"--nnodes={spec.nnodes}",
        f"--node-rank={spec.node_rank}",
        f"--master-addr={spec.master_addr}",
        f"--master-port={port}",
        "--max-restarts=0",
        "-m",
        "tuneforge.cli",
        *cli_args,
    ]


def launch(spec: LaunchSpec, cli_args: list[str], resume_from: str | None, threads: int | None = None) -> int:
    """Run `tuneforge <cli_args>` on spec.nproc processes of this node and wait; the exit code of the job."""
    env = dict(os.environ)
    env[RESUME_ENV] = resume_from or ""
    # one process per core at most, unless the config says otherwise (torchrun sets 1 when unset)
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // spec.nproc)))
    cmd = torchrun_command(spec, cli_args)
    proc = subprocess.run(cmd, env=env)
    return proc.returncode
