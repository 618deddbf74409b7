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


def run_child(script: str, out: Path, n_devices: int, timeout: int = 300) -> dict:
    """Run ``python script out`` with ``n_devices`` host devices; the JSON it wrote to ``out``."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())
