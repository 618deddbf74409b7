"""Published per-chip figures of the TPU generations ``hybrid-jax aot`` compiles for.

Peak dense bf16 FLOP/s, HBM capacity and HBM bandwidth per chip, from Google Cloud's TPU
documentation (the "System architecture" table of each generation's page, read 2026-11):
https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e. HBM capacities are the ones
the pages state (GB there; the compiler's own budget for a v5p chip, 95.74 GiB, is what its
out-of-memory errors quote). A topology's devices may be TensorCores rather than chips (libtpu
describes v4 with two devices per chip); ``per_device`` divides a chip's figures among them.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class ChipSpec:
    """One TPU generation's published per-chip figures."""

    generation: str  # as in libtpu topology names: "v5p" in "v5p:4x4x4"
    device_kind: str  # jax Device.device_kind of its devices
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per second
    hbm_bytes_per_s: float
    source: str

    def per_device(self, devices_per_chip: int) -> ChipSpec:
        """The figures of one of ``devices_per_chip`` devices sharing a chip."""
        if devices_per_chip == 1:
            return self
        n = devices_per_chip
        return ChipSpec(self.generation, self.device_kind, self.hbm_bytes // n,
                        self.peak_bf16_flops / n, self.hbm_bytes_per_s / n, self.source)


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 32 * GIB, 275e12, 1200e9,
                   "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9,
                    "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9,
                    "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1638e9,
                    "https://cloud.google.com/tpu/docs/v6e"),
}
