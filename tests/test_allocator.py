"""The `tuneforge` command starts under tcmalloc where the machine has it (cli/allocator.py)."""

import os
import platform
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tuneforge.cli.allocator import OPT_OUT, QUIET, find_tcmalloc, preload_env
from tuneforge.train.host_memory import GET_TCMALLOC, keep_freed_memory, preloaded_allocator

LIB = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def test_the_console_script_goes_through_the_allocator_entry():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tuneforge"]
    assert script.value == "tuneforge.cli.allocator:run"


def test_preload_env_prepends_tcmalloc_and_silences_its_large_alloc_reports():
    env = preload_env({"PATH": "/bin"}, platform="linux", library=LIB)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(LIB), "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    env = preload_env({"LD_PRELOAD": "/opt/libhook.so", QUIET_KEY: "5"}, platform="linux", library=LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:/opt/libhook.so" and env[QUIET_KEY] == "5"  # the user's setting stands


QUIET_KEY = next(iter(QUIET))


@pytest.mark.parametrize(
    "environ, plat",
    [
        ({}, "darwin"),  # Linux only
        ({OPT_OUT: "system"}, "linux"),  # the user's opt-out
        ({OPT_OUT: "SYSTEM"}, "linux"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux"),  # an allocator already chosen
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, "linux"),  # already re-executed
    ],
)
def test_no_reexecution_where_it_does_not_apply(environ, plat):
    assert preload_env(environ, platform=plat, library=LIB) is None


def test_find_tcmalloc_prefers_the_minimal_library(tmp_path):
    assert find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == tmp_path / "libtcmalloc.so.4"
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == tmp_path / "libtcmalloc_minimal.so.4"


def test_preloaded_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n"
    )
    assert preloaded_allocator(str(maps)) == "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert preloaded_allocator(str(maps)) is None
    assert preloaded_allocator(str(tmp_path / "missing")) is None


# what the console script does first, then what the training loop logs about the allocator it runs on
REEXEC = """
import os, sys
from tuneforge.cli.allocator import reexec_under_tcmalloc
print("pid", os.getpid(), flush=True)
reexec_under_tcmalloc()
from tuneforge.train.host_memory import keep_freed_memory
print("pid", os.getpid())
print(keep_freed_memory())
"""


def run_reexec(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT) and not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", REEXEC], capture_output=True, text=True, env={**base, **env}, check=True, timeout=120
    )
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or find_tcmalloc() is None,
    reason="needs Linux with glibc and tcmalloc installed (apt install libtcmalloc-minimal4)",
)
def test_the_command_reexecutes_itself_under_tcmalloc_in_the_same_process():
    *pids, log = run_reexec()
    assert len(pids) == 3 and len(set(pids)) == 1  # os.execve: the same process started again (the first line twice)
    assert log.startswith("host malloc: libtcmalloc") and log.endswith("(preloaded)")
    lines = run_reexec(**{OPT_OUT: "system"})
    assert len(lines) == 3 and lines[0] == lines[1]
    assert lines[2].startswith("host malloc keeps freed memory (glibc") and GET_TCMALLOC not in lines[2]


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or preloaded_allocator() is not None,
    reason="needs a process on glibc's malloc",
)
def test_on_glibc_the_log_says_how_to_get_tcmalloc(monkeypatch):
    for name in (OPT_OUT, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory().endswith(f"; {GET_TCMALLOC}")
