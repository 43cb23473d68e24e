"""Re-executing with glibc malloc on transparent huge pages: when, how, and that it takes effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxgen import host

GLIBC = (2, 36)


def test_wanted_only_on_new_glibc_with_madvise_mode_and_no_tunable_yet():
    """The decision table: glibc >= 2.35, THP mode 'madvise', tunable absent, no opt-out."""
    assert host.hugepages_wanted({}, GLIBC, "madvise")
    assert not host.hugepages_wanted({}, (2, 31), "madvise")  # glibc without the tunable
    assert not host.hugepages_wanted({}, None, "madvise")  # not glibc (macOS, musl)
    assert not host.hugepages_wanted({}, GLIBC, "never")  # the kernel would ignore it
    assert not host.hugepages_wanted({}, GLIBC, "always")  # huge pages already
    assert not host.hugepages_wanted({"GLIBC_TUNABLES": host.TUNABLE}, GLIBC, "madvise")
    assert not host.hugepages_wanted(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"
    )  # the user's own choice wins
    for off in ("0", "false", "off"):
        assert not host.hugepages_wanted({host.OPT_OUT: off}, GLIBC, "madvise")
    assert host.hugepages_wanted({host.OPT_OUT: "1"}, GLIBC, "madvise")
    assert host.hugepages_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host.thp_mode(path) == "madvise"
    path.write_text("[always] madvise never\n")
    assert host.thp_mode(path) == "always"
    assert host.thp_mode(tmp_path / "missing") is None


# Runs in a child: re-executes (when wanted), then reports its tunables and the minor page faults
# of filling a fresh 256 MiB malloc block (a new mapping; numpy would madvise huge pages itself).
CHILD = """
import ctypes, os, resource, sys
from jaxgen import host
host.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), faults, sys.argv[1:], sep="|")
"""


def _child(extra_env: dict[str, str]) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "--flag", "x y"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    tunables, faults, argv = out.split("|")
    return tunables, int(faults), argv


def test_reexec_keeps_argv_sets_the_tunable_and_cuts_page_faults():
    """The re-executed child keeps its arguments; with huge pages a 256 MiB fill faults ~512x
    less often than with 4 KiB pages (where the kernel offers huge pages at all)."""
    tunables, faults, argv = _child({})
    assert argv == "['--flag', 'x y']"
    plain_tunables, plain_faults, _ = _child({host.OPT_OUT: "0"})
    assert plain_tunables == ""
    assert plain_faults > 60_000  # 256 MiB in 4 KiB pages
    if host.hugepages_wanted({}, host.glibc_version(), host.thp_mode()):
        assert tunables == host.TUNABLE
        assert faults < plain_faults / 20
    else:  # this kernel or libc offers nothing to ask for: the child ran unchanged
        assert tunables == ""
