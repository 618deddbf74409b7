"""Transparent huge pages for XLA:CPU's per-step buffers (Linux, glibc >= 2.35).

XLA:CPU allocates an execution's temporaries as one block and frees it when the step ends.
glibc serves a block that large from a fresh ``mmap`` and returns it with ``munmap``, so every
step faults the whole block in again, 4 KiB at a time: for a train step, hundreds of thousands
of page faults and a large share of the step's CPU time in the kernel.

glibc's ``glibc.malloc.hugetlb=1`` tunable makes malloc ask for transparent huge pages
(``madvise``) for such blocks: 2 MiB pages, 512 times fewer faults, and fewer TLB misses in the
step's own loops.

Tunables are read once, when a process starts, so ``hybrid-jax`` restarts itself once with the
tunable added to ``GLIBC_TUNABLES`` (``restart_with_hugepages``). It does so only where it helps:
Linux with glibc >= 2.35, and the kernel's THP mode set to ``madvise`` (with ``always`` the
kernel already backs large blocks with huge pages; with ``never`` nothing can). Set
``HYBRID_JAX_HUGEPAGES=0`` to keep the process as started. In a notebook or your own script,
start Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for the same effect.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "HYBRID_JAX_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first release with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word: always, madvise or never),
    or None where the file is missing or unreadable (not Linux, or no THP support)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on if it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def hugepage_env(environ: Mapping[str, str], mode: str | None,
                 glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """The environment to restart with (``environ`` plus the tunable in ``GLIBC_TUNABLES``), or
    None when a restart would not help: opted out (``HYBRID_JAX_HUGEPAGES=0``), tunable already
    set, glibc older than 2.35 or absent, or THP mode other than ``madvise``."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if glibc is None or glibc < MIN_GLIBC or mode != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE.split("=")[0] for item in current.split(":") if item):
        return None  # set already, by us on the first start or by the user (either value)
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def restart_with_hugepages() -> None:
    """Replace this process with itself (same interpreter, same ``sys.orig_argv``) started with
    ``glibc.malloc.hugetlb=1`` when ``hugepage_env`` says it helps; return otherwise. Call it
    first thing in a command's entry point, before any work worth keeping."""
    env = hugepage_env(os.environ, thp_mode(), glibc_version())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
