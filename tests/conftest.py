"""Shared test set-up."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

from host_devices import xla_flags_with

# Tests check what is computed, not how fast it runs: XLA:CPU compiles 2-4x faster with LLVM
# at -O0 and its older loop emitters (tests/test_model_parity.py: 121 -> 45 s of CPU), which
# keeps the suite within CI's 15 minutes. Set before jax starts a backend; child processes
# (host_devices.py) and notebook kernels inherit it. Only where no accelerator plugin is
# installed (these are CPU-only concerns), and only once a child process has started jax with
# them: XLA aborts on a flag it does not know, and a later jax may drop one.
# HYBRID_JAX_TEST_XLA_DEFAULTS=1 tests with XLA's default compile instead.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _tpu_host() -> bool:
    """A TPU VM: libtpu is installed and the host has TPU device files (libtpu alone is the
    AOT compiler of the tpu extra, on any host)."""
    return importlib.util.find_spec("libtpu") is not None and bool(
        glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _accelerator_plugin() -> bool:
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or _tpu_host() or any(
        importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def _with_fast_compile() -> str | None:
    """XLA_FLAGS with FAST_COMPILE added, if this jax starts with them; else None."""
    flags = xla_flags_with(FAST_COMPILE)
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                           capture_output=True, timeout=120)
    return flags if probe.returncode == 0 else None


if not _accelerator_plugin():
    # CPU only: jax would otherwise try (and fail) to start libtpu's TPU backend in every
    # process, taking libtpu's one-process lock that the AOT tests' compiler needs.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from hybrid_jax.aot.topology import quiet_libtpu_environment  # starts no jax backend

    quiet_libtpu_environment()

if os.environ.get("HYBRID_JAX_TEST_XLA_DEFAULTS") != "1" and not _accelerator_plugin():
    _flags = _with_fast_compile()
    if _flags is not None:
        os.environ["XLA_FLAGS"] = _flags

import jax  # noqa: E402

# Full float32 matmuls everywhere, module-scoped fixtures included: accelerators' default (TF32 /
# bf16 passes) is ~1e-3 off the float64 and transformers references. Set for the whole session
# (not per test) so that a fixture's compile is reused by its tests rather than redone.
jax.config.update("jax_default_matmul_precision", "highest")


# The longest test files first (summed durations on the project's 2-core machine, longest
# first): pytest-xdist hands whole files to workers in collection order, so a long file
# collected last would run alone at the end of the suite.
LONGEST_FIRST = ("test_experiments_smoke.py", "test_aot.py", "test_gated_delta_rule.py",
                 "test_decode_cache.py", "test_qwen_family.py", "test_train.py",
                 "test_train_loop.py", "test_weight_memory.py", "test_notebooks.py",
                 "test_model_parity.py", "test_train_multihost.py", "test_kernels.py",
                 "test_lm_eval.py")


def pytest_collection_modifyitems(items):
    """Items of LONGEST_FIRST's files first, in that order; the rest as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
