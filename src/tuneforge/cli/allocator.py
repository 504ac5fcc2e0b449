"""The `tuneforge` command's entry point: start under tcmalloc when the machine has it.

glibc's malloc fragments badly under training on a CPU: activations of a different size every pass, freed in
a different order than allocated, leave holes its heap cannot reuse. On SmolLM2-135M (LoRA, 48 Alpaca rows,
docs/real-model.md) its heap grew to 5.25 GB while at most 2.2 GB was in use. tcmalloc, preloaded, ran the same
run at 3.1 GB instead of 5.9 GB peak RSS, and 5-9% faster; jemalloc at the same memory but 22% slower (it hands
pages back and faults them in again).

A library chosen at process start is chosen before the dynamic linker loads anything, so the command re-executes
itself once (`os.execve`: same process id, same arguments) with the library in `LD_PRELOAD`. Only where it is
found (Debian/Ubuntu: `apt install libtcmalloc-minimal4`), only on Linux, never when `LD_PRELOAD` already names
an allocator, and never with `TUNEFORGE_MALLOC=system`. Processes the command starts (the multi-process
launcher's workers) inherit it. Library use (`tuneforge.cli.main`) is left as it is: nothing is re-executed
under a caller. `train/host_memory.py` says in the log which allocator the process runs on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPT_OUT = "TUNEFORGE_MALLOC"  # "system": keep the C library's malloc
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # already preloaded by the user: leave it
# gperftools' tcmalloc without its heap profiler (libtcmalloc-minimal4), then the full one (libgoogle-perftools4)
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# tcmalloc reports every allocation over 1 GiB on stderr ("tcmalloc: large alloc ..."); a model load makes several
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> Path | None:
    for name in LIBRARIES:
        for d in dirs:
            path = Path(d) / name
            if path.is_file():
                return path
    return None


def preload_env(environ: dict[str, str], platform: str = sys.platform, library: Path | None = None) -> dict | None:
    """The environment to re-execute under, with tcmalloc preloaded; None to run as is."""
    if platform != "linux" or environ.get(OPT_OUT, "").lower() == "system":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ALLOCATORS):
        return None
    library = library or find_tcmalloc()
    if library is None:
        return None
    return {**QUIET, **environ, "LD_PRELOAD": f"{library}:{preloaded}" if preloaded else str(library)}


def reexec_under_tcmalloc() -> None:
    """Start this process again, same arguments, with tcmalloc preloaded; returns only where that does not apply."""
    env = preload_env(dict(os.environ))
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot re-execute (an unusual sandbox): go on with the C library's malloc
        pass


def run() -> int:
    """The `tuneforge` console script."""
    reexec_under_tcmalloc()
    from tuneforge.cli import main

    return main()
