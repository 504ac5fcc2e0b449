"""Keep freed host memory in the process on CPU runs, so a tensor allocated again does not page-fault.

glibc's malloc serves blocks above its mmap threshold with fresh `mmap` pages and hands them back on free;
the threshold adapts to the sizes freed so far, but activations whose sizes change with every batch keep
defeating it. Every fresh 4 KiB page then costs a kernel page fault plus zeroing, about 1.1 us here: a
64 MiB buffer takes 21 ms to allocate and fill fresh against 2.3 ms reused. A LoRA step on the benchmark
model took 15,000-60,000 such faults (17-70 ms, up to 6% of the step).

`keep_freed_memory()` sets the thresholds once (`mallopt`): blocks up to 32 MiB come from the heap, and
freed memory stays in the process (the heap top is trimmed only when over 2 GiB is free). Peak RSS does
not grow (the high-water mark is the same; it is just reused): 1.23 GB against 1.25-1.31 GB measured. Linux
with glibc only; a user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment settings are left as they are.

That reuse cannot undo glibc's fragmentation: on SmolLM2-135M its heap still grew to 5.25 GB for 2.2 GB in use.
The `tuneforge` command therefore starts under tcmalloc where the machine has it (cli/allocator.py); then
nothing is set here, and the log line says which allocator runs, or how to get tcmalloc.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int: trim only a free heap top over 2 GiB
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
GET_TCMALLOC = "apt install libtcmalloc-minimal4: the tuneforge command then uses it, about half the peak memory"


def preloaded_allocator(maps: str = "/proc/self/maps") -> str | None:
    """The path of a malloc replacement loaded into this process (LD_PRELOAD), or None."""
    try:
        lines = Path(maps).read_text().splitlines()
    except OSError:
        return None
    for fields in map(str.split, lines):  # address perms offset dev inode [path]
        if len(fields) >= 6 and any(name in Path(fields[-1]).name for name in ALLOCATORS):
            return fields[-1]
    return None


def keep_freed_memory() -> str:
    """Apply the thresholds; returns what was done, for the log."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "host malloc left as is (not glibc)"
    allocator = preloaded_allocator()
    if allocator is not None:
        return f"host malloc: {Path(allocator).name} (preloaded)"
    if any(name in os.environ for name in USER_SETTINGS):
        return "host malloc thresholds from the environment"
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "host malloc left as is (mallopt refused the thresholds)"
    hint = "" if os.environ.get("TUNEFORGE_MALLOC", "").lower() == "system" else f"; {GET_TCMALLOC}"
    return f"host malloc keeps freed memory (glibc: blocks up to 32 MiB from the heap, trimmed over 2 GiB free){hint}"
