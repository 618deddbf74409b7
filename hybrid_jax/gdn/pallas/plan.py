"""What the Pallas pipeline decides once per call, before any kernel runs.

``gdn_pallas`` builds one ``KernelPlan`` from the shapes, the dtype and the platform it is
lowered for, and hands it, as a static argument, to every stage: the backend, how per-token
arrays reach the kernels (``Layout``), the padded head dims, the value blocks, the GPU passes'
pipelining stages and how the forward forms its output. No stage chooses any of these again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.pallas.tiles import (
    BACKENDS,
    BLOCK_COLUMNS,
    batch_and_head,
    chunk_block,
    dot_dtype,
    pipeline_stages,
)

FORWARD_OUTPUTS = ("fused", "parallel")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How per-token arrays (q, k, v, the output and their cotangents) reach the kernels.

    token_major: the model's [B, T, H, D] arrays, read and written where they lie (on GPU a
      chunk's rows are just strided: no transposes around the kernels; q and k keep their own
      key heads, each read by its group of value heads). Otherwise [R = B * H, N, C, D]
      sequences of whole [C, D] tiles, as Mosaic TPU wants them (q and k repeated to H).
    heads: value heads H; sequence r is batch row r // H, value head r % H.
    """

    token_major: bool
    heads: int

    def block(self, rows: int, d: int, group: int = 1) -> pl.BlockSpec:
        """One chunk's [rows, d] of a per-token array on a (sequence, chunk, ...) grid; with
        ``group`` value heads per key head (token-major q and k, read unrepeated)."""
        if not self.token_major:
            return chunk_block(rows, d)

        def index(i, j, *_):
            b, h = batch_and_head(i, self.heads, group)
            return b, j, h, 0

        return pl.BlockSpec((None, rows, None, d), index)

    def shape(self, r: int, n: int, c: int, d: int) -> tuple[int, ...]:
        """A per-token array's shape: [R, N, C, d] sequences or token-major [B, N * C, H, d]."""
        return (r // self.heads, n * c, self.heads, d) if self.token_major else (r, n, c, d)


@dataclasses.dataclass(frozen=True)
class PassStages:
    """Triton software-pipelining stages of the three GPU state passes (1 on TPU: unused)."""

    forward: int
    states: int
    backward: int


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Everything the pipeline's stages take as given (hashable: a static argument).

    backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU).
    interpret: False to compile; True, or ``pltpu.InterpretParams`` (TPU semantics, race
      detection), to run the kernels as ordinary JAX ops (CPU).
    layout: per-token arrays' layout (``Layout``).
    chunk_size: C, a power of two.
    key_dim, value_dim: the head dims the kernels work on, zero-padded (``padded_head_dims``).
    block_v: value columns per GPU state-pass program (``gpu_value_block``); value_dim on TPU.
    stages: the GPU state passes' pipelining stages (``gpu_pass_stages``).
    forward_output: where the GPU forward forms its output: "fused" inside the state pass, or
      "parallel": the state pass writes the states and v_new and ``chunk_outputs`` forms every
      chunk's output at once (a shorter sequential pass for more memory traffic). The TPU
      forward always fuses.
    num_warps: Triton warps per GPU program.
    """

    backend: str
    interpret: Any
    layout: Layout
    chunk_size: int
    key_dim: int
    value_dim: int
    block_v: int
    stages: PassStages
    forward_output: str = "fused"
    num_warps: int = 4

    @property
    def column_width(self) -> int:
        """Head-dim columns a kernel handles at a time (``tiles.BLOCK_COLUMNS``)."""
        return BLOCK_COLUMNS[self.backend]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def gpu_key_dim(dk: int) -> int:
    """Dk padded for the GPU kernels, which hold keys as blocks of 64 columns: as far as the
    last block's width is a power of two (Triton tiles must be), at least 16 (the smallest a
    tensor-core dot takes). 96 stays 96 (64 + 32), 72 -> 80, 112 -> 128; up to 64, the next
    power of two."""
    if dk <= 64:
        return _pow2(dk)
    rest = dk % 64
    return dk - rest + (max(_pow2(rest), 16) if rest else 0)


def padded_head_dims(dk: int, dv: int, backend: str) -> tuple[int, int]:
    """(key_dim, value_dim) the kernels work on. GPU: keys per ``gpu_key_dim`` and values to a
    multiple of 64, the width every GPU kernel splits them into (a power of two, 256 for 192,
    would add a third more value work and state). TPU: both to powers of two, whole tiles of
    128 lanes (TPU memory tiles the minor dim to 128 lanes anyway, so narrower blocks would
    save no memory). The zero padding is exact: padded key dims never enter the state,
    padded value dims are sliced off."""
    if backend == "gpu":
        return gpu_key_dim(dk), (-(-dv // 64) * 64 if dv > 64 else _pow2(dv))
    return _pow2(dk), _pow2(dv)


def gpu_value_block(sequences: int, key_dim: int, value_dim: int) -> int:
    """Value columns per GPU state-pass program: 64, unless that leaves fewer than 64 programs
    (half the SMs of a Hopper card idle) or Dk is over 128 (a float32 [Dk, 64] state, Dk *
    64 / 128 registers per thread, spills), then 32."""
    return 64 if sequences * value_dim // 64 >= 64 and key_dim <= 128 else 32


def gpu_pass_stages(chunk_size: int, key_dim: int, block_v: int, dtype,
                    shared_bytes: int | None = None) -> PassStages:
    """The GPU state passes' pipelining stages for factors of ``dtype``: each loop iteration
    loads a [C, block_v] slice and the chunk's [C, Dk] / [C, C] factors (forward and backward:
    w, q_decayed, k_decayed, intra; the states pass: w, k_decayed), and keeps the [Dk, block_v]
    state as a matmul operand. Preferred: three stages forward, two backward (what ran fastest
    at OLMo Hybrid's layer in bf16), fewer where the buffers would not
    fit ``shared_bytes`` of shared memory (``tiles.pipeline_stages``; by default the device's).
    """
    size = jnp.dtype(dtype).itemsize
    c = chunk_size

    def stages(factor_widths: tuple[int, ...], preferred: int) -> int:
        per_stage = size * c * block_v + sum(size * c * d for d in factor_widths)
        return pipeline_stages(per_stage, preferred, resident_bytes=size * key_dim * block_v,
                               shared_bytes=shared_bytes)

    all_four = (key_dim, key_dim, key_dim, c)
    return PassStages(forward=stages(all_four, 3), states=stages((key_dim, key_dim), 3),
                      backward=stages(all_four, 2))


def plan_kernels(*, batch: int, heads: int, key_dim: int, value_dim: int, dtype,
                 chunk_size: int = 64, backend: str = "gpu", interpret: Any = False,
                 forward_output: str = "fused", token_major: bool | None = None,
                 block_v: int | None = None, num_warps: int = 4,
                 shared_bytes: int | None = None) -> KernelPlan:
    """The plan for a [B, T, H, Dk] / [B, T, H, Dv] call on inputs of ``dtype``.

    ``token_major`` defaults to the backend's layout (GPU token-major, TPU sequences) and
    ``block_v`` to ``gpu_value_block`` (GPU) or the whole padded value dim (TPU); kernel tests
    set them to drive one kernel directly. ``shared_bytes``: the GPU's shared memory per
    block, which bounds the pipelining stages (by default this process's first GPU's, or a
    Hopper's where there is none); ``num_warps``: Triton warps per program.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gdn_pallas: backend must be one of {BACKENDS}, got {backend!r}")
    if forward_output not in FORWARD_OUTPUTS:
        raise ValueError(f"gdn_pallas: forward_output must be one of {FORWARD_OUTPUTS}, got "
                         f"{forward_output!r}")
    pk, pv = padded_head_dims(key_dim, value_dim, backend)
    gpu = backend == "gpu"
    if block_v is None:
        block_v = gpu_value_block(batch * heads, pk, pv) if gpu else pv
    block_v = min(block_v, pv)
    stages = (gpu_pass_stages(chunk_size, pk, block_v, dot_dtype(dtype), shared_bytes) if gpu
              else PassStages(1, 1, 1))
    return KernelPlan(
        backend=backend, interpret=interpret,
        layout=Layout(token_major=gpu if token_major is None else token_major, heads=heads),
        chunk_size=chunk_size, key_dim=pk, value_dim=pv, block_v=block_v, stages=stages,
        forward_output=forward_output, num_warps=num_warps)


def compiler_params(plan: KernelPlan, semantics: tuple[str, ...], num_stages: int = 2):
    """Compiler parameters for the plan's backend: "gpu" names the Triton lowering explicitly
    (jax's default GPU lowering is Mosaic GPU, which copies whole blocks to shared memory and
    so cannot hold a whole sequence's block) with its pipelining stages; "tpu" gives Mosaic
    TPU the grid's ``semantics`` ("parallel" / "arbitrary" per grid axis). Interpret mode
    ignores both."""
    if plan.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=num_stages)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def check_chunk_size(c: int) -> None:
    """The kernels' solve doubles block inverses: C must be a power of two."""
    if c & (c - 1):
        raise ValueError(f"chunk size must be a power of two for the kernels, got {c}")

