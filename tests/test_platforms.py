"""``hybrid_jax.cli.platforms``: libtpu is not started as a backend on a host without TPUs,
and a ``hybrid-jax`` command there prints none of libtpu's initialisation errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_jax.cli.platforms import Host, has_tpu_devices, jax_platforms

CPU_HOST = Host(libtpu=True, tpu_devices=False, gpu_platforms=())


@pytest.mark.parametrize("host,environ,current,expected", [
    (CPU_HOST, {}, None, "cpu"),
    (Host(True, False, ("cuda",)), {}, None, "cuda,cpu"),
    (Host(True, True, ()), {}, None, None),  # a TPU host: libtpu is its backend
    (Host(False, False, ()), {}, None, None),  # no libtpu: nothing to keep out
    (Host(True, False, None), {}, None, None),  # a plugin of unknown platform: jax chooses
    (CPU_HOST, {"JAX_PLATFORMS": ""}, None, None),  # the user's choice, even "" (jax's)
    (CPU_HOST, {"JAX_PLATFORMS": "tpu"}, "tpu", None),
    (CPU_HOST, {"JAX_FORCE_TPU_INIT": "1"}, None, None),
    (CPU_HOST, {}, "cpu", None),  # set in jax.config by the caller
])
def test_platforms_leave_out_libtpu_only_on_a_host_without_tpus(host, environ, current,
                                                                 expected):
    assert jax_platforms(host, environ, current) == expected


# What libtpu prints when jax starts it on a host without TPUs.
LIBTPU_NOISE = ("could not determine TPU", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT",
                "libtpu_init_utils", "Logging before InitGoogle")


def _user_environment() -> dict:
    """The user's environment: no JAX_PLATFORMS, nor conftest's libtpu settings that quiet it."""
    quiet = {"JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY",
             "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_HOST_BOUNDS"}
    return {k: v for k, v in os.environ.items() if k not in quiet}


def _libtpu_noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)]


@pytest.mark.skipif(has_tpu_devices(), reason="a TPU host: libtpu is the backend here")
def test_a_command_prints_no_libtpu_errors_without_jax_platforms(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    # The mesh check asks jax for its devices (starting its backends), then fails at once.
    proc = subprocess.run([sys.executable, "-m", "hybrid_jax.cli", "train", "--text",
                           str(text), "--mesh", "fsdp=4096"], env=_user_environment(),
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs 4096 devices" in proc.stderr
    assert not _libtpu_noise(proc.stderr), proc.stderr[-3000:]


def test_aot_reaches_libtpus_compiler_without_its_warnings():
    """``hybrid-jax aot`` loads libtpu as a compiler: it compiles, and prints none of
    libtpu's start-up warnings (the host's accelerator type, worker hostnames). One compile
    (``--no-cost``): the cost compiles and their report are tests/test_aot.py's."""
    proc = subprocess.run([sys.executable, "-m", "hybrid_jax.cli", "aot", "--topology",
                           "v5e:2x2", "--preset", "tiny", "--batch", "4", "--seq-len", "64",
                           "--programs", "decode", "--no-cost"], env=_user_environment(),
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode" in proc.stdout and "yes" in proc.stdout, proc.stdout
    assert not _libtpu_noise(proc.stderr + proc.stdout), proc.stderr[-3000:]
