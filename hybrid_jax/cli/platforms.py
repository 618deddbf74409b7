"""Which jax platforms a ``hybrid-jax`` command starts: jax's own choice, except that libtpu
is not started as a backend on a host without TPUs.

libtpu (the ``tpu`` extra) is installed on any host for ``hybrid-jax aot``, which uses it as
a compiler only. jax registers it as a backend whenever it is installed and, with
JAX_PLATFORMS unset, starts it on the first device query; on a host without TPUs libtpu then
prints its initialisation errors ("could not determine TPU accelerator type", "INVALID_ARGUMENT:
... unexpected worker hostname") and takes its one-process lock before jax falls back to the
next platform. Leaving ``tpu`` out of ``jax_platforms`` there avoids both; on a TPU host, or
where the user set JAX_PLATFORMS, nothing changes.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """What the platform choice depends on: libtpu is installed; TPU device files are present;
    the jax platforms of the installed GPU plugins ("cuda", "rocm"), or None where a plugin's
    platform is unknown."""

    libtpu: bool
    tpu_devices: bool
    gpu_platforms: tuple[str, ...] | None


def has_tpu_devices() -> bool:
    """Whether TPU chips are attached: the device files libtpu opens, /dev/accel<N> (TPU v2-v4)
    or /dev/vfio/<N> (v5e and later). A host with other VFIO devices counts as a TPU host,
    which only leaves jax's own choice in place."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _gpu_platforms() -> tuple[str, ...] | None:
    """The platforms of the installed jax plugins other than libtpu (entry points of group
    jax_plugins, modules of the jax_plugins namespace package): "cuda" for the CUDA plugins,
    "rocm" (where /dev/kfd, the AMD GPU driver, is present) for ROCm's; None for any other."""
    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins  # a namespace package: each module in it is a plugin

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    platforms = []
    for name in sorted(names):
        if "cuda" in name:
            platforms.append("cuda")  # jax skips it where no NVIDIA GPU is visible
        elif "rocm" in name:
            if os.path.exists("/dev/kfd"):
                platforms.append("rocm")
        else:
            return None
    return tuple(dict.fromkeys(platforms))


def probe_host() -> Host:
    """This host's Host (reads the file system and the installed packages only; starts no
    jax backend)."""
    return Host(libtpu=importlib.util.find_spec("libtpu") is not None,
                tpu_devices=has_tpu_devices(), gpu_platforms=_gpu_platforms())


def jax_platforms(host: Host, environ: Mapping[str, str], current: str | None) -> str | None:
    """The ``jax_platforms`` value a command should set, or None to leave jax's choice:
    with JAX_PLATFORMS (or JAX_FORCE_TPU_INIT) in ``environ``, or ``current`` (jax's
    jax_platforms setting) not None, the user chose; without libtpu there is nothing to keep
    out; with TPU devices libtpu is the backend. Otherwise the GPU platforms, then "cpu"."""
    user_chose = "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ or current
    if user_chose or not host.libtpu or host.tpu_devices or host.gpu_platforms is None:
        return None
    return ",".join((*host.gpu_platforms, "cpu"))


def choose_platforms() -> str | None:
    """Set jax's ``jax_platforms`` for this host (``jax_platforms(probe_host(), ...)``) before
    any backend starts; the value set, or None where jax's choice stays."""
    import jax

    value = jax_platforms(probe_host(), os.environ, jax.config.jax_platforms)
    if value is not None:
        jax.config.update("jax_platforms", value)
    return value


__all__ = ["Host", "choose_platforms", "has_tpu_devices", "jax_platforms", "probe_host"]
