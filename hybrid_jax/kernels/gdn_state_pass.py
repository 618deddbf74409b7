"""Pallas kernel: the chunked gated delta rule's pass across chunks, state kept on chip.

The XLA ``chunk`` form (``hybrid_jax.ops.gdn_chunk``) scans over chunks with ``lax.scan``: every
chunk's [Dk, Dv] state goes back to memory between steps, and each step is several small XLA
ops. Here one kernel program owns one (batch row, head) and loops over its chunks with the state
in a loop carry (registers / on-chip memory), so per chunk it reads the chunk's factors once
and writes its output once:

    v_new = u - w S;   o = q_decayed S + intra v_new;   S = chunk_decay * S + k_decayed^T v_new

The per-chunk factors (the WY/UT solve, u, w, the intra-chunk attention, with segment resets)
come from ``hybrid_jax.ops.gdn_common.chunk_factors``, computed for all chunks at once by XLA.
Its slow, obviously-right twin is ``hybrid_jax.ops.gdn_chunk``'s scan step (``_state_step``).

Two variants of one chunk step (``_chunk_step``):
- ``state_pass`` (GPU-style, Triton-lowering Pallas backend): one program per row and head
  loops over its chunks inside the kernel, reading each chunk from the whole-sequence arrays.
  Head dims are padded to powers of two by the caller, as Triton blocks must be.
- ``state_pass_tpu`` (Mosaic TPU): the chunk axis is a sequential ("arbitrary") grid
  dimension, each grid step gets one chunk's blocks in VMEM, and the state lives in a VMEM
  scratch that persists across the steps: whole sequences would not fit VMEM.
Both are verified in interpret mode only (the TPU one with ``pltpu.InterpretParams``, which
also detects races and out-of-bounds reads); no accelerator was available when they were
written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import compiler_params
from hybrid_jax.kernels.common import mm as _mm


def _chunk_step(u, w, qd, kd, intra, decay, state):
    """One chunk: (o [C, Dv], next state [Dk, Dv]) from its factors and the state entering it.
    The state and all sums are float32; matmul operands take the factors' dtype (bf16 for bf16
    inputs: tensor cores)."""
    dt = u.dtype
    v_new = u.astype(jnp.float32) - _mm(w, state, dt)  # [C, Dv]
    o = _mm(qd, state, dt) + _mm(intra, v_new, dt)
    return o, decay * state + _mm(kd.T, v_new, dt)


def _gpu_kernel(u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, s0_ref, o_ref, s_ref, *,
                n_chunks: int):
    def chunk(n, state):
        o, state = _chunk_step(u_ref[n], w_ref[n], qd_ref[n], kd_ref[n], intra_ref[n],
                               decay_ref[n], state)
        o_ref[n] = o.astype(o_ref.dtype)
        return state

    s_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[...])


def _tpu_kernel(u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, s0_ref, o_ref, s_ref,
                state_ref):
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    o, state = _chunk_step(u_ref[...], w_ref[...], qd_ref[...], kd_ref[...], intra_ref[...],
                           decay_ref[...], state_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = state

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        s_ref[...] = state


@functools.partial(jax.jit, static_argnames=("block_v", "interpret"))
def state_pass(u: jax.Array, w: jax.Array, q_decayed: jax.Array, k_decayed: jax.Array,
               intra: jax.Array, chunk_decay: jax.Array, initial_state: jax.Array, *,
               block_v: int = 64, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Run the state across chunks.

    Args (one leading axis R for the independent (row, head) sequences):
      u: [R, N, C, Dv]; w, q_decayed, k_decayed: [R, N, C, Dk]; intra: [R, N, C, C], all in
        one dtype (bf16 or float32), which the matmul operands take;
      chunk_decay: [R, N] and initial_state: [R, Dk, Dv], float32.
      block_v: value columns per program. The rule is independent across value columns, so
        the grid is (R, Dv / block_v): a [Dk, block_v] state stays in registers, and more
        programs run at once.
      interpret: run the kernel body as ordinary JAX ops (CPU tests).
    Returns:
      (o [R, N, C, Dv] in u's dtype, final state [R, Dk, Dv] float32).
    """
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    bv = min(block_v, dv)
    if dv % bv:
        raise ValueError(f"state_pass: Dv={dv} is not a multiple of block_v={bv}")
    decay = chunk_decay.astype(jnp.float32)[:, :, None, None]  # [R, N, 1, 1]: one block per chunk

    def whole(*shape, split_v=False):
        """The whole per-sequence array, one sequence (and value block) per program."""
        last = (lambda j: (j,)) if split_v else (lambda j: (0,))
        return pl.BlockSpec((None, *shape),
                            lambda i, j: (i,) + (0,) * (len(shape) - 1) + last(j))

    return pl.pallas_call(
        functools.partial(_gpu_kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=[whole(n, c, bv, split_v=True), whole(n, c, dk), whole(n, c, dk),
                  whole(n, c, dk), whole(n, c, c), whole(n, 1, 1), whole(dk, bv, split_v=True)],
        out_specs=[whole(n, c, bv, split_v=True), whole(dk, bv, split_v=True)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dv), u.dtype),
                   jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)],
        compiler_params=compiler_params("gpu", ("parallel", "parallel")),
        interpret=interpret,
    )(u, w, q_decayed, k_decayed, intra, decay, initial_state)


def state_pass_tpu(u: jax.Array, w: jax.Array, q_decayed: jax.Array, k_decayed: jax.Array,
                   intra: jax.Array, chunk_decay: jax.Array, initial_state: jax.Array, *,
                   interpret=False) -> tuple[jax.Array, jax.Array]:
    """``state_pass`` for Mosaic TPU: grid (sequences, chunks), the state in a VMEM scratch.

    Same arguments and results as ``state_pass``; ``interpret`` may be
    ``pltpu.InterpretParams(...)`` (race and out-of-bounds detection) or True.
    """
    from jax.experimental.pallas import tpu as pltpu

    r, n, c, dv = u.shape
    dk = w.shape[-1]
    decay = chunk_decay.astype(jnp.float32)[:, :, None, None]  # [R, N, 1, 1]

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, *shape), lambda i, j: (i, j) + (0,) * len(shape))

    def per_seq(*shape):
        return pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))

    return pl.pallas_call(
        _tpu_kernel,
        grid=(r, n),
        in_specs=[per_chunk(c, dv), per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dk),
                  per_chunk(c, c), per_chunk(1, 1), per_seq(dk, dv)],
        out_specs=[per_chunk(c, dv), per_seq(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dv), u.dtype),
                   jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=compiler_params("tpu", ("parallel", "arbitrary")),
        interpret=interpret,
    )(u, w, q_decayed, k_decayed, intra, decay, initial_state)
