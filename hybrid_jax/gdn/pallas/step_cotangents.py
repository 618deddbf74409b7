"""Pallas kernel: the factors' cotangents of the state pass, local to each chunk once the states
are known.

The state pass (``state_step``) runs, per chunk with S the state entering it,

    v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay * S + k_decayed^T v_new.

Given S and v_new (which the forward state pass stores for the backward, as
flash-linear-attention does, rather than this kernel recomputing u - w S), G' = dL/dS' and
dv_new = dL/dv_new (the backward state pass's results) and the output's cotangent dO, the rest
of the VJP has no dependence across chunks:

    d_w = -dv_new S^T;   d_q_decayed = dO S^T;   d_k_decayed = v_new G'^T;
    d_intra = dO v_new^T;   d_chunk_decay = sum(S * G');   d_u = dv_new.

Per (sequence, chunk), one program per block of key columns forms that block's d_w,
d_q_decayed, d_k_decayed and part of d_chunk_decay, and (on GPU) one more program d_intra,
each in blocks of value columns (on GPU), so that few float32 sums are live at once: all five
accumulated in one program spilled registers (``experiments/kernel_registers.py`` shows each
kernel's spills). Matmul operands take the factors' dtype (bf16 for bf16 inputs, as the state
pass does) with float32 sums. The twin is ``jax.vjp`` of
``hybrid_jax.gdn.chunk.chunk_state_step`` (tests). GPU (Triton) and Mosaic TPU share the body:
grid (sequence, chunk, key block), plus d_intra's program per chunk on GPU; on TPU a key block
is the whole key dim and one program forms everything.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.chunk_factors import ChunkFactors
from hybrid_jax.gdn.pallas.plan import KernelPlan, compiler_params
from hybrid_jax.gdn.pallas.state_step import EnteringStates, PassCotangents
from hybrid_jax.gdn.pallas.tiles import chunk_block, column_blocks, cost_estimate, in_own_program, mm


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
            d_intra = d_intra + mm(do_ref[:, cols], vn_ref[:, cols].T, dt)
        dintra_ref[...] = d_intra

    def key_block(keys):
        d_w = d_qd = d_kd = d_decay = 0.0
        for cols in value_blocks:
            state, grad = s_ref[keys, cols], g_ref[keys, cols]  # [block, block]
            d_w = d_w - mm(dvn_ref[:, cols], state.T, dt)
            d_qd = d_qd + mm(do_ref[:, cols], state.T, dt)
            d_decay = d_decay + jnp.sum(state.astype(f32) * grad.astype(f32))
        dw_ref[:, keys] = d_w.astype(dw_ref.dtype)
        dqd_ref[:, keys] = d_qd
        for cols in value_blocks:
            d_kd = d_kd + mm(vn_ref[:, cols], g_ref[keys, cols].T, dt)
        dkd_ref[:, keys] = d_kd
        ddecay_ref[...] = d_decay * jnp.ones((1, 1), f32)

    in_own_program(block, s_ref.shape[0], width, key_block)


@functools.partial(jax.jit, static_argnames=("plan",))
def step_cotangents(entering: EnteringStates, d_out: jax.Array, passed: PassCotangents, *,
                    plan: KernelPlan) -> ChunkFactors:
    """The factors' cotangents from the states and the backward state pass.

    Args:
      entering: the forward pass's ``EnteringStates``: the state entering each chunk
        [R, N, Dk, Dv] and v_new [R, N, C, Dv] = u - w S, in the factors' dtype, which the
        matmul operands take (the final state goes unread).
      d_out: the output's cotangent, in the plan's per-token layout (only a matmul operand).
      passed: the backward pass's ``PassCotangents``: dv_new [R, N, C, Dv] and grads
        [R, N, Dk, Dv], the cotangent of the state leaving each chunk. The states and grads
        enter d_chunk_decay too, summed in float32 from the values as given.
    Returns: the cotangents as ``ChunkFactors``: u is dv_new itself; w in the factors' dtype
      (a matmul operand wherever it goes); float32 q_decayed, k_decayed [R, N, C, Dk], intra
      [R, N, C, C] and chunk_decay [R, N].
    """
    v_new, states, grads = entering.v_new, entering.states, passed.grads
    r, n, c, dv = v_new.shape
    dk = states.shape[-2]
    f32, dt = jnp.float32, v_new.dtype

    width = plan.column_width
    key_blocks = len(column_blocks(dk, width))
    separate_intra = plan.backend == "gpu"  # d_intra in a program of its own (``_kernel``)
    operands = (v_new, d_out.astype(dt), passed.dv_new.astype(dt), states, grads)
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
        in_specs=[chunk_block(c, dv), plan.layout.block(c, dv), chunk_block(c, dv),
                  *[chunk_block(dk, dv)] * 2],
        out_specs=[chunk_block(c, dk)] * 3 + [chunk_block(c, c), decay_part],
        out_shape=out_shape,
        # The last axis is "arbitrary": its programs share output blocks (each writing its own
        # part), which Mosaic TPU must not split across cores.
        compiler_params=compiler_params(plan, ("parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate(r * n, flops, 0, operands, out_shape),
        interpret=plan.interpret,
    )(*operands)
    return ChunkFactors(u=passed.dv_new, w=d_w, q_decayed=d_qd, k_decayed=d_kd, intra=d_intra,
                        chunk_decay=jnp.sum(d_decay[..., 0], axis=-1))
