"""Pallas kernel: everything local to one chunk of the gated delta rule, fused.

One program per (sequence, chunk) computes, from the chunk's q, k, v, g, beta and segment
index, what the pass across chunks needs (``hybrid_jax.gdn.chunk_factors.ChunkFactors``):

    decay_log[i, j] = sum_{j < t <= i} g_t        (one matmul: summed directly, no cancellation)
    A = strict_tril(beta_i (k_i . k_j) exp(decay_log))   masked (causal, same segment) before exp
    T = (I + A)^-1                                 exact block inverses, doubled level by level
    u = T (beta v);  w = T (beta exp(gamma) k);  intra = scale (q k^T) exp(decay_log)
    q_decayed = scale exp(gamma) q;  k_decayed = exp(gamma_C - gamma) k;  chunk_decay = exp(gamma_C)

with segment resets zeroing every term that would cross a segment start. Its slow,
obviously-right twin is ``hybrid_jax.gdn.chunk_factors.chunk_factors`` (XLA); tests compare
the two. Both backends share the body: the chunk is the block on a parallel grid, and the solve
works on whole [C, C] tiles with masks (``factor_tiles``). For the backward, the kernel also
writes each chunk's T^T (``chunk_factors_with_inverse``), so that the VJP
(``chunk_factors_vjp``) need not solve again.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.chunk_factors import ChunkFactors
from hybrid_jax.gdn.pallas.factor_tiles import (
    as_column,
    as_rows,
    gates,
    iotas,
    keys_matrix,
    per_token_blocks,
    products,
    unit_lower_inverse_tile,
)
from hybrid_jax.gdn.pallas.layout import KernelInputs
from hybrid_jax.gdn.pallas.plan import KernelPlan, check_chunk_size, compiler_params
from hybrid_jax.gdn.pallas.tiles import (
    chunk_block,
    column_blocks,
    cost_estimate,
    dot_dtype,
    mm,
    solve_flops,
    solve_matmul,
    solve_pieces,
)


class FactorsWithInverse(NamedTuple):
    """The factors, and each chunk's T^T [R, N, C, C], T = (I + A)^-1, as the pieces the
    solve's products take (``tiles.solve_pieces``): bf16 (hi, lo) for 16-bit inputs, one
    float32 array otherwise."""

    factors: ChunkFactors
    inverse_t: tuple[jax.Array, ...]


def _factors_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *inv_t_refs, scale: float,
            width: int):
    """One (sequence, chunk): its factors from its inputs; given ``inv_t_refs``, also T^T."""
    f32 = jnp.float32
    dt = u_ref.dtype  # matmul operand dtype: the inputs' (bf16) or float32
    beta = as_column(beta_ref)  # [C, 1]
    row, col = iotas(q_ref.shape[0])
    decay, from_start, to_end, chunk_decay = gates(as_column(g_ref), as_column(seg_ref), row,
                                                   col)
    # A first, then the intra-chunk output written before the solve: neither q k^T nor the
    # decays stay live through it (fewer registers spilled on GPU).
    a = keys_matrix(k_ref, beta, decay, row, col, width)
    intra_ref[...] = (scale * products(q_ref, k_ref, width) * decay).astype(dt)
    inv = unit_lower_inverse_tile(a, row, col, solve_matmul(k_ref.dtype))
    if inv_t_refs:  # for the VJP: T^T as the matmul pieces its products take
        for ref, piece in zip(inv_t_refs, solve_pieces(inv.T, q_ref.dtype)):
            ref[...] = piece

    # Head dims in blocks of ``width`` columns: whole [C, 256] float32 tiles would not fit a
    # GPU program's registers.
    for cols in column_blocks(v_ref.shape[-1], width):
        u_ref[:, cols] = mm(inv, beta * v_ref[:, cols].astype(f32), dt).astype(dt)
    for cols in column_blocks(k_ref.shape[-1], width):
        k = k_ref[:, cols].astype(f32)
        w_ref[:, cols] = mm(inv, beta * from_start * k, dt).astype(dt)
        qd_ref[:, cols] = (scale * from_start * q_ref[:, cols].astype(f32)).astype(dt)
        kd_ref[:, cols] = (to_end * k).astype(dt)
    decay_ref[...] = chunk_decay


def _call(inputs: KernelInputs, scale: float, plan: KernelPlan, with_inverse: bool):
    q, v, g = inputs.q, inputs.v, inputs.g
    r, n, c = g.shape
    check_chunk_size(c)
    dk, dv = q.shape[-1], v.shape[-1]
    tok, keys = per_token_blocks(q, plan.layout)
    f32, dt = jnp.float32, dot_dtype(q.dtype)
    operands = (q, inputs.k, v, as_rows(g.astype(f32)), as_rows(inputs.beta.astype(f32)),
                as_rows(inputs.seg.astype(jnp.int32)))
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), dt),
                 *[jax.ShapeDtypeStruct((r, n, c, dk), dt)] * 3,
                 jax.ShapeDtypeStruct((r, n, c, c), dt),
                 jax.ShapeDtypeStruct((r, n, 1, 1), f32)]
    out_specs = [chunk_block(c, dv), *[chunk_block(c, dk)] * 3, chunk_block(c, c),
                 chunk_block(1, 1)]
    if with_inverse:
        pieces = 1 if dt == f32 else 2  # ``solve_pieces``: the float32 tile, or (hi, lo)
        out_shape += [jax.ShapeDtypeStruct((r, n, c, c), dt)] * pieces
        out_specs += [chunk_block(c, c)] * pieces
    # k k^T, q k^T, w: [C, C, Dk] products; u: [C, C, Dv]; plus the gates and the solve.
    flops = 2 * c * c * (3 * dk + dv) + solve_flops(c, q.dtype)
    u, w, qd, kd, intra, decay, *inverse_t = pl.pallas_call(
        functools.partial(_factors_kernel, scale=scale, width=plan.column_width),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), tok(c, dv), *[chunk_block(1, c)] * 3],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel")),
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=plan.interpret,
    )(*operands)
    return ChunkFactors(u, w, qd, kd, intra, decay[..., 0, 0]), tuple(inverse_t)


@functools.partial(jax.jit, static_argnames=("scale", "plan"))
def chunk_factors_kernel(inputs: KernelInputs, *, scale: float,
                         plan: KernelPlan) -> ChunkFactors:
    """Per-chunk factors for every chunk of every sequence.

    Args:
      inputs: in the plan's layout (``layout.KernelInputs``): q, k [.., Dk], v [.., Dv]
        float32 or bfloat16; g, beta [R, N, C] float32; seg [R, N, C] int32.
    Returns:
      ``ChunkFactors`` laid out [R, N, ...]: u [R, N, C, Dv], w, q_decayed, k_decayed
      [R, N, C, Dk] and intra [R, N, C, C] in the matmul operand dtype
      (``tiles.dot_dtype(q.dtype)``: bf16 for bf16 inputs, else float32), chunk_decay [R, N]
      float32. Everything before (gates, decays, the solve) is float32.
    """
    return _call(inputs, scale, plan, with_inverse=False)[0]


@functools.partial(jax.jit, static_argnames=("scale", "plan"))
def chunk_factors_with_inverse(inputs: KernelInputs, *, scale: float,
                               plan: KernelPlan) -> FactorsWithInverse:
    """``chunk_factors_kernel``, and each chunk's T^T for ``chunk_factors_vjp``."""
    return FactorsWithInverse(*_call(inputs, scale, plan, with_inverse=True))
