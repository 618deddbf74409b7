"""Pallas kernel: the factors' cotangents of the state pass, local to each chunk once the states
are known.

The state pass (``gdn_state_pass``) runs, per chunk with S the state entering it,

    v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay * S + k_decayed^T v_new.

Given S, G' = dL/dS' and dv_new = dL/dv_new (the backward state pass's results) and the
output's cotangent dO, the rest of the VJP has no dependence across chunks:

    d_w = -dv_new S^T;   d_q_decayed = dO S^T;   d_k_decayed = v_new G'^T;
    d_intra = dO v_new^T;   d_chunk_decay = sum(S * G');   d_u = dv_new.

One program per (sequence, chunk) forms all five, in blocks of value and key columns (on GPU)
and in separate passes (d_intra; d_w, d_q_decayed and d_chunk_decay; d_k_decayed), so that
few float32 sums are live at once. With all five accumulated together it took 2.4 ms on an
H200 at OLMo Hybrid's layer (against 2.9 ms for the five XLA einsums it replaced), far from
the 0.2 ms that reading S and G' costs: compiled for sm_90a it spilled 4.7 KB of registers
per thread; the passes spill 0.2 KB (experiments/kernel_registers.py), speed not yet
measured on a GPU. Matmul operands take the factors' dtype (bf16 for bf16 inputs, as the
state pass does) with float32 sums. The twin is ``jax.vjp`` of ``hybrid_jax.ops.gdn_chunk``'s
step (tests). GPU (Triton) and Mosaic TPU share the body: a parallel grid over (sequence,
chunk).
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
)
from hybrid_jax.kernels.common import mm as _mm


def _kernel(u_ref, w_ref, do_ref, dvn_ref, s_ref, g_ref,
            dw_ref, dqd_ref, dkd_ref, dintra_ref, ddecay_ref, *, width: int):
    f32 = jnp.float32
    dt = w_ref.dtype
    value_blocks = column_blocks(u_ref.shape[-1], width)

    def v_new(cols):  # [C, block]: recomputed per pass rather than kept live
        return u_ref[:, cols].astype(f32) - _mm(w_ref[...], s_ref[:, cols], dt)

    # Separate passes keep few sums live at once: all of them together ([C, Dk] x 3 plus
    # [C, C] float32) spilled registers. First d_intra, then one block of key columns at a
    # time.
    d_intra = 0.0
    for cols in value_blocks:
        d_intra = d_intra + _mm(do_ref[:, cols], v_new(cols).T, dt)
    dintra_ref[...] = d_intra
    d_decay = 0.0
    for keys in column_blocks(w_ref.shape[-1], width):
        d_w = d_qd = d_kd = 0.0
        for cols in value_blocks:
            state, grad = s_ref[keys, cols], g_ref[keys, cols]  # [block, block] float32
            d_w = d_w - _mm(dvn_ref[:, cols], state.T, dt)
            d_qd = d_qd + _mm(do_ref[:, cols], state.T, dt)
            d_decay = d_decay + jnp.sum(state * grad)
        dw_ref[:, keys] = d_w
        dqd_ref[:, keys] = d_qd
        for cols in value_blocks:
            d_kd = d_kd + _mm(v_new(cols), g_ref[keys, cols].T, dt)
        dkd_ref[:, keys] = d_kd
    ddecay_ref[...] = d_decay * jnp.ones((1, 1), f32)


@functools.partial(jax.jit, static_argnames=("backend", "interpret"))
def step_cotangents(u: jax.Array, w: jax.Array, d_out: jax.Array, dv_new: jax.Array,
                    states: jax.Array, grads: jax.Array, *, backend: str = "gpu",
                    interpret=False):
    """The factors' cotangents from the states and the backward state pass.

    Args:
      u: [R, N, C, Dv] and w: [R, N, C, Dk], the factors (their dtype is the matmul operands');
      d_out: [R, N, C, Dv], the output's cotangent, and dv_new: [R, N, C, Dv], both only
        matmul operands (cast to the factors' dtype, as the products would anyway);
      states: [R, N, Dk, Dv], the state entering each chunk, and grads: [R, N, Dk, Dv], the
        cotangent of the state leaving it, float32.
      backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU); interpret: as for the others.
    Returns (float32): d_w, d_q_decayed, d_k_decayed [R, N, C, Dk], d_intra [R, N, C, C],
      d_chunk_decay [R, N]. (d_u is dv_new itself.)
    """
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    f32 = jnp.float32

    width = BLOCK_COLUMNS[backend]
    operands = (u, w, d_out.astype(w.dtype), dv_new.astype(w.dtype), states.astype(f32),
                grads.astype(f32))
    out_shape = [*[jax.ShapeDtypeStruct((r, n, c, dk), f32)] * 3,
                 jax.ShapeDtypeStruct((r, n, c, c), f32),
                 jax.ShapeDtypeStruct((r, n, 1, 1), f32)]
    # [C, Dk, Dv] products: w S once for d_intra and once per key block for d_kd, then d_w,
    # d_qd, d_kd; one [C, C, Dv] for d_intra.
    key_blocks = -(-dk // width)
    flops = 2 * c * dk * dv * (4 + key_blocks) + 2 * c * c * dv
    d_w, d_qd, d_kd, d_intra, d_decay = pl.pallas_call(
        functools.partial(_kernel, width=width),
        grid=(r, n),
        in_specs=[chunk_block(c, dv), chunk_block(c, dk), chunk_block(c, dv), chunk_block(c, dv),
                  chunk_block(dk, dv), chunk_block(dk, dv)],
        out_specs=[chunk_block(c, dk), chunk_block(c, dk), chunk_block(c, dk), chunk_block(c, c),
                   chunk_block(1, 1)],
        out_shape=out_shape,
        compiler_params=compiler_params(backend, ("parallel", "parallel")),
        cost_estimate=cost_estimate(r * n, flops, 0, operands, out_shape),
        interpret=interpret,
    )(*operands)
    return d_w, d_qd, d_kd, d_intra, d_decay[..., 0, 0]
