"""Pallas kernel: the factors' cotangents of the state pass, local to each chunk once the states
are known.

The state pass (``gdn_state_pass``) runs, per chunk with S the state entering it,

    v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay * S + k_decayed^T v_new.

Given S and v_new (which the forward state pass stores for the backward, as
flash-linear-attention does, rather than this kernel recomputing u - w S), G' = dL/dS' and
dv_new = dL/dv_new (the backward state pass's results) and the output's cotangent dO, the rest
of the VJP has no dependence across chunks:

    d_w = -dv_new S^T;   d_q_decayed = dO S^T;   d_k_decayed = v_new G'^T;
    d_intra = dO v_new^T;   d_chunk_decay = sum(S * G');   d_u = dv_new.

Per (sequence, chunk), one program per block of key columns forms that block's d_w,
d_q_decayed, d_k_decayed and part of d_chunk_decay, and (on GPU) one more program d_intra,
each in blocks of value columns (on GPU) so that few float32 sums are live at once. With all five
accumulated together in one program it took 2.4 ms on an H200 at OLMo Hybrid's layer (against
2.9 ms for the five XLA einsums it replaced), far from the 0.2 ms that reading S and G' costs:
compiled for sm_90a it spilled 4.7 KB of registers per thread; as separate passes in one
program it spilled 0.2-0.45 KB; as separate programs, nothing (experiments/
kernel_registers.py). Its speed since is not yet measured on a GPU. Matmul operands take
the factors' dtype (bf16 for bf16 inputs, as the state pass does) with float32 sums. The twin
is ``jax.vjp`` of ``hybrid_jax.ops.gdn_chunk``'s step (tests). GPU (Triton) and Mosaic TPU
share the body: grid (sequence, chunk, key block), plus d_intra's program per chunk on GPU; on
TPU a key block is the whole key dim and one program forms everything.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import (
    BLOCK_COLUMNS,
    chunk_block,
    column_blocks,
    compiler_params,
    cost_estimate,
    in_own_program,
    sequence_block,
)
from hybrid_jax.kernels.common import mm as _mm


def _kernel(vn_ref, do_ref, dvn_ref, s_ref, g_ref,
            dw_ref, dqd_ref, dkd_ref, dintra_ref, ddecay_ref, *, width: int, intra_block: int):
    """One program per (sequence, chunk, block of key columns) for that key block's d_w,
    d_q_decayed, d_k_decayed and part of d_chunk_decay (``s_ref`` and ``g_ref`` hold the
    chunk's whole states, the outputs its whole rows: each program reads and writes its own
    key block, a static slice, so the last block may be narrower, as Dk = 96 = 64 + 32); the
    program ``intra_block`` also forms d_intra. On GPU that is one more program per chunk:
    separate programs keep few sums live at once (d_intra's pass and d_k_decayed's, in one
    program, spilled registers even one key block at a time). On TPU (one key block, whole
    tiles in VMEM) it is the same program: each grid step costs fixed time there."""
    f32 = jnp.float32
    dt = vn_ref.dtype
    value_blocks = column_blocks(vn_ref.shape[-1], width)
    block = pl.program_id(2)

    @pl.when(block == intra_block)
    def _():
        d_intra = 0.0
        for cols in value_blocks:
            d_intra = d_intra + _mm(do_ref[:, cols], vn_ref[:, cols].T, dt)
        dintra_ref[...] = d_intra

    def key_block(keys):
        d_w = d_qd = d_kd = d_decay = 0.0
        for cols in value_blocks:
            state, grad = s_ref[keys, cols], g_ref[keys, cols]  # [block, block]
            d_w = d_w - _mm(dvn_ref[:, cols], state.T, dt)
            d_qd = d_qd + _mm(do_ref[:, cols], state.T, dt)
            d_decay = d_decay + jnp.sum(state.astype(f32) * grad.astype(f32))
        dw_ref[:, keys] = d_w.astype(dw_ref.dtype)
        dqd_ref[:, keys] = d_qd
        for cols in value_blocks:
            d_kd = d_kd + _mm(vn_ref[:, cols], g_ref[keys, cols].T, dt)
        dkd_ref[:, keys] = d_kd
        ddecay_ref[...] = d_decay * jnp.ones((1, 1), f32)

    in_own_program(block, s_ref.shape[0], width, key_block)


@functools.partial(jax.jit, static_argnames=("backend", "heads", "interpret"))
def step_cotangents(v_new: jax.Array, d_out: jax.Array, dv_new: jax.Array, states: jax.Array,
                    grads: jax.Array, *, backend: str = "gpu", heads: int | None = None,
                    interpret=False):
    """The factors' cotangents from the states and the backward state pass.

    Args:
      v_new: [R, N, C, Dv], each chunk's corrected values u - w S (the forward state pass
        returns them with its states), in the factors' dtype, which the matmul operands take;
      d_out: [R, N, C, Dv], the output's cotangent (given ``heads``, token-major
        [B, N * C, H, Dv]: ``common.sequence_block``), and dv_new: [R, N, C, Dv], both only
        matmul operands (cast to that dtype, as the products would anyway);
      states: [R, N, Dk, Dv], the state entering each chunk, and grads: [R, N, Dk, Dv], the
        cotangent of the state leaving it: float32 or the factors' dtype (the state passes
        store them so). Besides matmul operands, they only enter d_chunk_decay, summed in
        float32 from the values as given.
      backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU); interpret: as for the others.
    Returns: d_w [R, N, C, Dk] in the factors' dtype (a matmul operand wherever it goes);
      float32 d_q_decayed, d_k_decayed [R, N, C, Dk], d_intra [R, N, C, C] and
      d_chunk_decay [R, N]. (d_u is dv_new itself.)
    """
    r, n, c, dv = v_new.shape
    dk = states.shape[-2]
    f32, dt = jnp.float32, v_new.dtype

    width = BLOCK_COLUMNS[backend]
    key_blocks = len(column_blocks(dk, width))
    separate_intra = backend == "gpu"  # d_intra in a program of its own (``_kernel``)
    operands = (v_new, d_out.astype(dt), dv_new.astype(dt), states, grads)
    # d_w is only ever a matmul operand (of the factors' VJP): it takes their dtype.
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dk), dt),
                 *[jax.ShapeDtypeStruct((r, n, c, dk), f32)] * 2,
                 jax.ShapeDtypeStruct((r, n, c, c), f32),
                 jax.ShapeDtypeStruct((r, n, key_blocks, 1), f32)]  # d_decay per key block
    # d_w, d_qd and d_kd: [C, Dk, Dv] products; d_intra: [C, C, Dv].
    flops = 3 * 2 * c * dk * dv + 2 * c * c * dv

    # Grid (R, N, key block [+ 1]); d_chunk_decay's part from each key block goes to a block
    # of its own, which a separate d_intra program (which writes none) clamps.
    decay_part = pl.BlockSpec((None, None, 1, 1),
                              lambda i, j, b: (i, j, jnp.minimum(b, key_blocks - 1), 0))
    d_w, d_qd, d_kd, d_intra, d_decay = pl.pallas_call(
        functools.partial(_kernel, width=width,
                          intra_block=key_blocks if separate_intra else 0),
        grid=(r, n, key_blocks + separate_intra),
        in_specs=[chunk_block(c, dv), sequence_block(c, dv, heads), chunk_block(c, dv),
                  *[chunk_block(dk, dv)] * 2],
        out_specs=[chunk_block(c, dk)] * 3 + [chunk_block(c, c), decay_part],
        out_shape=out_shape,
        # The last axis is "arbitrary": its programs share output blocks (each writing its own
        # part), which Mosaic TPU must not split across cores.
        compiler_params=compiler_params(backend, ("parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate(r * n, flops, 0, operands, out_shape),
        interpret=interpret,
    )(*operands)
    return d_w, d_qd, d_kd, d_intra, jnp.sum(d_decay[..., 0], axis=-1)
