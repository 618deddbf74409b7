"""host_memory: when the CLI restarts itself with glibc's huge-page tunable, and that it does."""

import os
import subprocess
import sys

import pytest

from hybrid_jax.host_memory import (
    TUNABLE,
    glibc_version,
    hugepage_env,
    thp_mode,
)

GLIBC = (2, 36)


def test_restart_env_adds_the_tunable_only_where_it_helps():
    env = hugepage_env({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    # Other tunables are kept, the new one appended.
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert hugepage_env({}, "always", GLIBC) is None  # the kernel already uses huge pages
    assert hugepage_env({}, "never", GLIBC) is None
    assert hugepage_env({}, None, GLIBC) is None  # no THP support
    assert hugepage_env({}, "madvise", (2, 34)) is None  # before glibc.malloc.hugetlb
    assert hugepage_env({}, "madvise", None) is None  # not glibc
    for off in ("0", "false", "No", "off"):
        assert hugepage_env({"HYBRID_JAX_HUGEPAGES": off}, "madvise", GLIBC) is None
    assert hugepage_env({"HYBRID_JAX_HUGEPAGES": "1"}, "madvise", GLIBC) is not None
    # Already set (our own restart, or the user's choice of value): no second restart.
    for tunables in (TUNABLE, "glibc.malloc.hugetlb=0", f"glibc.malloc.arena_max=2:{TUNABLE}"):
        assert hugepage_env({"GLIBC_TUNABLES": tunables}, "madvise", GLIBC) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert thp_mode(str(path)) == "always"
    path.write_text("garbage\n")
    assert thp_mode(str(path)) is None
    assert thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("opt_out", [False, True])
def test_restart_replaces_the_process_with_the_tunable_set(opt_out):
    code = ("import os, sys; from hybrid_jax.host_memory import restart_with_hugepages; "
            "print('start', flush=True); restart_with_hugepages(); "
            "print('tunables=' + os.environ.get('GLIBC_TUNABLES', ''))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if opt_out:
        env["HYBRID_JAX_HUGEPAGES"] = "0"
    else:
        env.pop("HYBRID_JAX_HUGEPAGES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    expected = None if opt_out else hugepage_env({}, thp_mode(), glibc_version())
    if expected is None:
        assert out == ["start", "tunables="]
    else:  # the restarted process ran the same command line again, now with the tunable
        assert out == ["start", "start", f"tunables={TUNABLE}"]
