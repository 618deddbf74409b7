"""TPU topologies described by libtpu, for compiling ahead of time without a TPU.

``jax.experimental.topologies.get_topology_desc`` gives abstract devices of a named slice
("v5p:4x4x4": 64 v5p chips) on any host with libtpu installed (``pip install -e .[tpu]``);
programs lowered onto a mesh of them compile with the real XLA TPU compiler.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import jax
from jax.sharding import Mesh

from hybrid_jax.aot.chips import CHIPS, ChipSpec
from hybrid_jax.sharding import MeshShape, ShardingError, make_mesh


class AOTError(ValueError):
    """Bad input to an ahead-of-time compile: the message names the topology, mesh axis or
    dimension at fault."""


def quiet_libtpu_environment() -> None:
    """Environment for using libtpu as a compiler only, set where not already set: libtpu
    otherwise looks for TPU workers in cloud metadata and warns at length, warns that it
    cannot tell this host's accelerator type (the host bounds: the compile's topology is
    named explicitly, so they do not enter it), and refuses a second process while one holds
    it (its lockfile), which compile-only use does not need."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclass(frozen=True)
class Topology:
    """A TPU slice's abstract devices (or ``slices`` such slices, joined by the data-center
    network). ``device_spec`` is one device's share of the chip's figures (libtpu describes a
    v4 chip as two devices, one per TensorCore)."""

    name: str
    devices: tuple[jax.Device, ...]
    chip: ChipSpec
    num_chips: int
    slices: int = 1

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.num_chips

    @property
    def device_spec(self) -> ChipSpec:
        return self.chip.per_device(self.devices_per_chip)

    def mesh(self, shape: MeshShape) -> Mesh:
        """The library's mesh (``sharding.MESH_AXES``) over these devices."""
        try:
            return make_mesh(shape, devices=self.devices)
        except ShardingError as e:
            raise AOTError(f"mesh {shape} does not match topology {self.name} "
                           f"({len(self.devices)} devices): {e}") from None


_SHAPE = re.compile(r"\d+x\d+(x\d+)?")


def tpu_topology(name: str, slices: int = 1) -> Topology:
    """The topology ``name`` ("v5e:2x2", "v5p:4x4x4", "v6e:16x16", "v4:2x2x1"), from libtpu;
    ``slices`` > 1: that many such slices (multi-slice, ``sharding.make_mesh`` runs the mesh's
    data axis across them).

    Raises AOTError for a generation not in ``chips.CHIPS``, a malformed shape, a shape
    libtpu rejects, a bad slice count, or a missing libtpu."""
    generation, sep, shape = name.partition(":")
    if not sep or generation not in CHIPS:
        raise AOTError(f"topology {name!r}: unknown TPU generation {generation!r}; expected "
                       f"GENERATION:SHAPE with GENERATION one of {sorted(CHIPS)}, "
                       f"e.g. v5p:4x4x4")
    if not _SHAPE.fullmatch(shape):
        raise AOTError(f"topology {name!r}: shape {shape!r} is not AxB or AxBxC")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise AOTError(f"topology {name!r}: slices must be a positive int, got {slices!r}")
    if importlib.util.find_spec("libtpu") is None:
        raise AOTError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    quiet_libtpu_environment()
    from jax.experimental import topologies

    try:
        extra = {"num_slices": slices} if slices > 1 else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **extra)
    except Exception as e:  # libtpu raises JaxRuntimeError with its own wording
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AOTError(f"topology {name!r}: libtpu rejects it: {reason}") from None
    devices = tuple(desc.devices)
    chip = CHIPS[generation]
    if devices[0].device_kind != chip.device_kind:
        raise AOTError(f"topology {name!r}: libtpu describes {devices[0].device_kind!r} "
                       f"devices, not {chip.device_kind!r}")
    chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices})
    return Topology(name, devices, chip, chips, slices)
