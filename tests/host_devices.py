"""Running a test file as a child process with several simulated CPU devices.

XLA's device count is fixed when jax initialises, so mesh tests run their body in a fresh
interpreter with ``--xla_force_host_platform_device_count`` and read back a JSON result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def xla_flags_with(extra: str) -> str:
    """This process's XLA_FLAGS with ``extra`` appended."""
    return f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()


def child_env(n_devices: int) -> dict[str, str]:
    """This process's environment for a child with ``n_devices`` CPU devices (the other XLA
    flags kept: conftest's compile options)."""
    return dict(os.environ, XLA_FLAGS=xla_flags_with(
        f"--xla_force_host_platform_device_count={n_devices}"), JAX_PLATFORMS="cpu")


def run_child(script: str, out: Path, n_devices: int, timeout: int = 300) -> dict:
    """Run ``python script out`` with ``n_devices`` host devices; the JSON it wrote to ``out``."""
    env = child_env(n_devices)
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())
