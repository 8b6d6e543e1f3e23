"""The host allocator's transparent huge pages: when ``jaxloss-train`` restarts itself to ask
for them, that the restart happens once and keeps the command, and that glibc then backs
large blocks with huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import huge_pages
from train.huge_pages import restart_environment

ROOT = Path(__file__).resolve().parent.parent
GLIBC = "glibc 2.36"


@pytest.mark.parametrize("environ, libc, mode, tunables", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"JAXLOSS_HUGE_PAGES": "1"}, "glibc 2.35", "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise", None),  # already restarted: no loop
    ({"JAXLOSS_HUGE_PAGES": "0"}, GLIBC, "madvise", None),
    ({"JAXLOSS_HUGE_PAGES": "off"}, GLIBC, "madvise", None),
    ({}, "glibc 2.34", "madvise", None),  # the tunable came with 2.35
    ({}, "", "madvise", None),  # musl, or not Linux
    ({}, GLIBC, "always", None),  # every region has them already
    ({}, GLIBC, "never", None),
    ({}, GLIBC, "", None),
])
def test_restart_environment_asks_for_huge_pages_only_where_they_help(environ, libc, mode, tunables):
    env = restart_environment({"PATH": "/bin", **environ}, libc=libc, thp_mode=mode)
    if tunables is None:
        assert env is None
    else:
        assert env == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": tunables}
        assert huge_pages.active(env)
        assert restart_environment(env, libc=libc, thp_mode=mode) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(path) == "madvise"
    path.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode(path) == "always"
    assert huge_pages.thp_mode(tmp_path / "missing") == ""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLOSS_HUGE_PAGES")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _host_qualifies() -> bool:
    return huge_pages.restart_environment_here({}) is not None


@pytest.mark.skipif(not _host_qualifies(), reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
def test_the_process_restarts_once_with_the_tunable_and_its_arguments():
    code = ("import os, sys; print('started', sys.argv[1:], flush=True); from train import huge_pages; "
            "huge_pages.restart_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], os.getpid())")
    out = subprocess.run([sys.executable, "-c", code, "a b", "--flag"], env=_clean_env(), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[:2] == ["started ['a b', '--flag']"] * 2  # once before the restart, once after, same arguments
    assert out[2].split()[0] == "glibc.malloc.hugetlb=1" and len(out) == 3
    off = subprocess.run([sys.executable, "-c", code], env=_clean_env(JAXLOSS_HUGE_PAGES="0"), capture_output=True,
                         text=True).stdout.splitlines()
    assert off[0] == "started []" and len(off) == 1  # no restart; GLIBC_TUNABLES unset: KeyError after it


@pytest.mark.skipif(not _host_qualifies(), reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
def test_with_the_tunable_a_large_block_is_backed_by_huge_pages():
    """The reason for the restart, checked on this host: a 256 MiB block from libc's ``malloc``
    (as XLA:CPU's buffers are), written once, is mapped with huge pages (``AnonHugePages`` of
    the process) with the tunable, and not without. (numpy's arrays would not do: numpy asks
    for huge pages itself.)"""
    code = ("import ctypes, re; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; n = 256 << 20; "
            "p = libc.malloc(n); ctypes.memset(p, 1, n); "
            "print(re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1))")

    def huge_kib(**env: str) -> int:
        return int(subprocess.run([sys.executable, "-c", code], env=_clean_env(**env), capture_output=True, text=True,
                                  check=True).stdout)

    assert huge_kib(GLIBC_TUNABLES="glibc.malloc.hugetlb=1") >= 128 << 10
    assert huge_kib() < 16 << 10
