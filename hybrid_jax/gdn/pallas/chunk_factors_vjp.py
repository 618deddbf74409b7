"""Pallas kernels: the VJP of the chunk factor kernel, from its recompute's T^T.

Given the cotangents of a chunk's factors (``ChunkFactors``, from ``step_cotangents`` and the
backward state pass) and T^T, T = (I + A)^-1, as ``chunk_factors_with_inverse`` wrote it,
three kernels take them back to q, k, v, g and beta, each small enough to stay in a GPU
program's registers:

1. through the solve, per chunk: dv, dA = -T^T dT T^T (on A's strictly lower support) and the
   per-row sums (dbeta's u/w terms, the decays' from the chunk's start and to its end);
2. through the gates, per chunk: dg, dbeta, and the [C, C] cotangents of q k^T and k k^T;
3. per (chunk, block of key columns): dq and dk.

The gates are recomputed, the solve is not. The twin is ``jax.vjp`` of
``hybrid_jax.gdn.chunk_factors.chunk_factors`` (tests).
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
    decay_from_start,
    gates,
    iotas,
    per_token_blocks,
    products,
    row_sums,
)
from hybrid_jax.gdn.pallas.layout import KernelInputs
from hybrid_jax.gdn.pallas.plan import KernelPlan, compiler_params
from hybrid_jax.gdn.pallas.tiles import (
    chunk_block,
    column_blocks,
    cost_estimate,
    dot_dtype,
    in_own_program,
    mm,
    mm_exact_mask,
    mm_pieces,
    solve_passes,
    solve_pieces,
)


class InputCotangents(NamedTuple):
    """dq, dk [.., Dk] and dv [.., Dv] in the layout and dtypes of q, k and v (dq and dk per
    value head); dg and dbeta [R, N, C] float32."""

    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    dg: jax.Array
    dbeta: jax.Array


class _SolveCotangents(NamedTuple):
    dv: jax.Array  # like v
    d_a: jax.Array  # [R, N, C, C] float32
    dbeta: jax.Array  # [R, N, 1, C] float32, the u and w terms
    d_from_start: jax.Array  # [R, N, 1, C] float32
    d_to_end: jax.Array  # [R, N, 1, C] float32


class _GateCotangents(NamedTuple):
    dg: jax.Array  # [R, N, 1, C] float32
    dbeta: jax.Array  # [R, N, 1, C] float32, all terms
    d_qk: jax.Array  # [R, N, C, C], matmul operands
    d_kk: jax.Array  # [R, N, C, C], d(k k^T) + its transpose
    from_start: jax.Array  # [R, N, 1, C] float32, recomputed decays
    to_end: jax.Array  # [R, N, 1, C] float32


def _backward_solve_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, du_ref, dw_ref,
                           dqd_ref, dkd_ref, *refs, scale: float, width: int):
    """The VJP's first part, through the solve: given (I + A)^-1 = T as the pieces of T^T that
    the forward kernel wrote (``refs``' first one or two; its products take them as they are),
    u = T (beta v), w = T (beta fs k) give dv, dA = -T^T dT T^T (on A's strictly lower
    support), and the per-row sums: dbeta's u/w terms, d from_start, d to_end. Sums and
    results are float32, save dv in v's dtype (d_u and d_w come as matmul operands in the
    inputs' dtype)."""
    *inv_t_refs, dv_ref, d_a_ref, dbeta_ref, d_fs_ref, d_te_ref = refs
    f32 = jnp.float32
    dt = dot_dtype(q_ref.dtype)
    beta = as_column(beta_ref)
    row, col = iotas(q_ref.shape[0])
    from_start = decay_from_start(as_column(g_ref), as_column(seg_ref), row >= col)
    inv_t = lambda: tuple(ref[...] for ref in inv_t_refs)  # fresh loads: nothing kept live
    # The forward's u = T (beta v) and w = T (beta fs k) take T's leading piece (bf16 for bf16
    # inputs), so their cotangents do too: d(beta v) = T0^T du, d(beta fs k) = T0^T dw.
    for cols in column_blocks(v_ref.shape[-1], width):
        dv_ref[:, cols] = (beta * mm(inv_t_refs[0][...], du_ref[:, cols], dt)
                           ).astype(dv_ref.dtype)
    # Everything else needs only two [C, C] sums over the value and key columns, v_du = v du^T
    # and k_dw = k dw^T (no per-column products with T kept live beside them), with rows
    # scaled by the [C, 1] columns beta and fs:
    #   dT = (beta (v_du + fs k_dw))^T;  rowsum(v * T0^T du) = rowsum(T0^T * v_du), same for k.
    v_du = k_dw = d_from_start = d_to_end = 0.0
    for cols in column_blocks(v_ref.shape[-1], width):
        v_du = v_du + mm(v_ref[:, cols], du_ref[:, cols].T, dt)
    for cols in column_blocks(k_ref.shape[-1], width):
        k_dw = k_dw + mm(k_ref[:, cols], dw_ref[:, cols].T, dt)
        q, k = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32)
        d_from_start = d_from_start + scale * row_sums(q * dqd_ref[:, cols])
        d_to_end = d_to_end + row_sums(k * dkd_ref[:, cols])
    t0 = inv_t_refs[0][...].astype(f32)
    k_d_bk = row_sums(t0 * k_dw)  # rowsum(k * T0^T dw)
    d_fs_ref[...] = (d_from_start + beta * k_d_bk).T
    both = v_du + from_start * k_dw
    dbeta_ref[...] = row_sums(t0 * both).T
    d_inv = (beta * both).T
    d_inv_t = solve_pieces(mm_pieces(solve_pieces(d_inv, q_ref.dtype), inv_t()), q_ref.dtype)
    d_a_ref[...] = jnp.where(row > col, -mm_pieces(inv_t(), d_inv_t), 0.0)
    d_te_ref[...] = d_to_end.T


def _backward_gates_kernel(q_ref, k_ref, g_ref, beta_ref, seg_ref, dintra_ref, ddecay_ref,
                           d_a_ref, dbeta_ref, d_fs_ref, d_te_ref, dg_ref, dbeta_out_ref,
                           d_qk_ref, d_kk_ref, from_start_ref, to_end_ref, *,
                           scale: float, width: int):
    """The VJP's second part: from dA and d intra, through A = strict(beta kk decay) and
    intra = scale qk decay: dbeta, d(k k^T), d(q k^T), then the gates (dg) through each
    masked exp (masked entries are zero, so their cotangents vanish there). Writes d_qk and
    d_kk + d_kk^T as matmul operands, and the decays from the chunk's start and to its end,
    for ``_backward_columns_kernel``."""
    beta = as_column(beta_ref)
    row, col = iotas(q_ref.shape[0])
    causal, strict = row >= col, row > col
    decay, from_start, to_end, chunk_decay = gates(as_column(g_ref), as_column(seg_ref), row,
                                                   col)
    # In an order that keeps few [C, C] tiles live (on GPU, registers): with M = dA * decay,
    # d(k k^T) = beta M, dbeta = rowsum(M kk), d(q k^T) = scale d_intra decay, and the decays'
    # log cotangent d_log = beta M kk + d(q k^T) qk.
    m = d_a_ref[...] * decay
    d_kk = beta * m
    d_kk_ref[...] = (d_kk + d_kk.T).astype(d_kk_ref.dtype)
    m = m * products(k_ref, k_ref, width)
    dbeta_out_ref[...] = (as_column(dbeta_ref) + row_sums(m)).T
    d_qk = scale * dintra_ref[...] * decay
    d_qk_ref[...] = d_qk.astype(d_qk_ref.dtype)
    # d decay_log[i, j]; decay_log[i, j] sums g_t over j < t <= i
    d_log = beta * m + d_qk * products(q_ref, k_ref, width)
    per_t = mm_exact_mask(d_log, row < col)  # [i, t] = sum_{j < t} d_log[i, j]
    dg = jnp.sum(jnp.where(causal, per_t, 0.0), axis=0, keepdims=True).T  # sum over i >= t
    d_gamma = as_column(d_fs_ref) * from_start  # gamma[i] sums g_t over t <= i
    dg = dg + jnp.sum(jnp.where(causal, d_gamma, 0.0), axis=0, keepdims=True).T
    d_to_end_log = d_te_ref[...] * to_end.T  # [1, C]; to_end_log[j] sums g_t over t > j
    dg = dg + jnp.sum(jnp.where(strict, d_to_end_log, 0.0), axis=1, keepdims=True)
    dg_ref[...] = (dg + ddecay_ref[...] * chunk_decay).T
    from_start_ref[...] = from_start.T
    to_end_ref[...] = to_end.T


def _backward_columns_kernel(q_ref, k_ref, beta_ref, dw_ref, dqd_ref, dkd_ref, inv_t_ref,
                             d_qk_ref, d_kk_ref, from_start_ref, to_end_ref, dq_ref, dk_ref, *,
                             scale: float, width: int):
    """dq and dk for one block of key columns (program ``program_id(2)`` of the chunk's; a
    static slice of its whole rows, so the last block may be narrower), from the chunk's
    [C, C] cotangents (``_backward_solve_kernel``, ``_backward_gates_kernel``):
    dq = d_qk k + scale fs dqd;  dk = beta fs T^T dw + d_qk^T q + (d_kk + d_kk^T) k + te dkd."""
    f32 = jnp.float32
    dt = d_qk_ref.dtype

    def key_block(cols):
        q, k = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32)
        d_qk, from_start = d_qk_ref[...], as_column(from_start_ref)
        dq_ref[:, cols] = (mm(d_qk, k, dt)
                           + scale * from_start * dqd_ref[:, cols]).astype(dq_ref.dtype)
        dk_ref[:, cols] = (
            as_column(beta_ref) * from_start * mm(inv_t_ref[...], dw_ref[:, cols], dt)
            + mm(d_qk.T, q, dt) + mm(d_kk_ref[...], k, dt)
            + as_column(to_end_ref) * dkd_ref[:, cols]).astype(dk_ref.dtype)

    in_own_program(pl.program_id(2), q_ref.shape[-1], width, key_block)


def _per_row(r: int, n: int, c: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((r, n, 1, c), jnp.float32)  # one row of C per chunk


def _through_solve(inputs: KernelInputs, d: ChunkFactors, inverse_t: tuple, scale: float,
                   plan: KernelPlan) -> _SolveCotangents:
    q, v = inputs.q, inputs.v
    r, n, c = inputs.g.shape
    dk, dv = q.shape[-1], v.shape[-1]
    f32, dt = jnp.float32, dot_dtype(q.dtype)
    tok, keys = per_token_blocks(q, plan.layout)
    operands = (q, inputs.k, v, as_rows(inputs.g.astype(f32)),
                as_rows(inputs.beta.astype(f32)), as_rows(inputs.seg.astype(jnp.int32)),
                d.u.astype(dt), d.w.astype(dt), d.q_decayed.astype(f32),
                d.k_decayed.astype(f32), *inverse_t)
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((r, n, c, c), f32), *[_per_row(r, n, c)] * 3]
    # Two [C, C, Dv] and two [C, C, Dk] products, and dA's two.
    flops = 2 * c * c * (2 * dk + 2 * dv) + 4 * c ** 3 * solve_passes(q.dtype)
    return _SolveCotangents(*pl.pallas_call(
        functools.partial(_backward_solve_kernel, scale=scale, width=plan.column_width),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), tok(c, dv), *[chunk_block(1, c)] * 3,
                  chunk_block(c, dv), *[chunk_block(c, dk)] * 3,
                  *[chunk_block(c, c)] * len(inverse_t)],
        out_specs=[tok(c, dv), chunk_block(c, c), *[chunk_block(1, c)] * 3],
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel")),
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=plan.interpret,
    )(*operands))


def _through_gates(inputs: KernelInputs, d: ChunkFactors, solved: _SolveCotangents,
                   scale: float, plan: KernelPlan) -> _GateCotangents:
    q = inputs.q
    r, n, c = inputs.g.shape
    dk = q.shape[-1]
    f32, dt = jnp.float32, dot_dtype(q.dtype)
    _, keys = per_token_blocks(q, plan.layout)
    operands = (q, inputs.k, as_rows(inputs.g.astype(f32)), as_rows(inputs.beta.astype(f32)),
                as_rows(inputs.seg.astype(jnp.int32)), d.intra.astype(f32),
                d.chunk_decay.astype(f32)[..., None, None], solved.d_a, solved.dbeta,
                solved.d_from_start, solved.d_to_end)
    out_shape = [_per_row(r, n, c), _per_row(r, n, c),
                 *[jax.ShapeDtypeStruct((r, n, c, c), dt)] * 2,
                 _per_row(r, n, c), _per_row(r, n, c)]
    # k k^T, q k^T, the decay sums and dg's per-position sums (three bf16 passes each).
    flops = 2 * c * c * 2 * dk + 2 * 3 * 2 * c ** 3
    per_chunk_row = chunk_block(1, c)
    return _GateCotangents(*pl.pallas_call(
        functools.partial(_backward_gates_kernel, scale=scale, width=plan.column_width),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), *[per_chunk_row] * 3, chunk_block(c, c),
                  chunk_block(1, 1), chunk_block(c, c), *[per_chunk_row] * 3],
        out_specs=[per_chunk_row, per_chunk_row, chunk_block(c, c), chunk_block(c, c),
                   per_chunk_row, per_chunk_row],
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel")),
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=plan.interpret,
    )(*operands))


def _key_columns(inputs: KernelInputs, d: ChunkFactors, inverse_t: tuple,
                 gated: _GateCotangents, scale: float, plan: KernelPlan):
    """(dq, dk), per (chunk, block of key columns)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    r, n, c = inputs.g.shape
    dk = q.shape[-1]
    f32, dt = jnp.float32, dot_dtype(q.dtype)
    tok, keys = per_token_blocks(q, plan.layout)
    operands = (q, k, as_rows(inputs.beta.astype(f32)), d.w.astype(dt),
                d.q_decayed.astype(f32), d.k_decayed.astype(f32), inverse_t[0], gated.d_qk,
                gated.d_kk, gated.from_start, gated.to_end)
    per_value_head = (*v.shape[:-1], dk)  # [R, N, C, Dk], or [B, N * C, H, Dk]
    out_shape = [jax.ShapeDtypeStruct(per_value_head, q.dtype),
                 jax.ShapeDtypeStruct(per_value_head, k.dtype)]
    return pl.pallas_call(
        functools.partial(_backward_columns_kernel, scale=scale, width=plan.column_width),
        # Grid (R, N, key block): each program takes its key columns itself.
        grid=(r, n, len(column_blocks(dk, plan.column_width))),
        in_specs=[keys(c, dk), keys(c, dk), chunk_block(1, c), *[chunk_block(c, dk)] * 3,
                  *[chunk_block(c, c)] * 3, chunk_block(1, c), chunk_block(1, c)],
        out_specs=[tok(c, dk), tok(c, dk)],
        out_shape=out_shape,
        # The last axis is "arbitrary": its programs share output blocks (each writing its own
        # columns), which Mosaic TPU must not split across cores.
        compiler_params=compiler_params(plan, ("parallel", "parallel", "arbitrary")),
        # dq: one [C, C, Dk] product; dk: three.
        cost_estimate=cost_estimate(r * n, 4 * 2 * c * c * dk, 0, operands, out_shape),
        interpret=plan.interpret,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("scale", "plan"))
def chunk_factors_vjp(inputs: KernelInputs, d_factors: ChunkFactors,
                      inverse_t: tuple[jax.Array, ...], *, scale: float,
                      plan: KernelPlan) -> InputCotangents:
    """The VJP of ``chunk_factors_kernel`` at ``inputs``.

    Args:
      inputs: as for ``chunk_factors_kernel`` (``layout.KernelInputs``).
      d_factors: the factors' cotangents, their shapes, any float dtype (d_u and d_w are only
        matmul operands, cast to the matmul dtype; the rest used as float32).
      inverse_t: each chunk's T^T, ``chunk_factors_with_inverse(...).inverse_t``.
    Returns:
      ``InputCotangents``: dq, dk, dv in q's, k's and v's layout and dtypes (each summed in
      float32 and rounded once, in the kernel; dq and dk per value head: with grouped q and
      k the caller sums each group), dg and dbeta [R, N, C] float32.
    """
    inverse_t = tuple(inverse_t)
    solved = _through_solve(inputs, d_factors, inverse_t, scale, plan)
    gated = _through_gates(inputs, d_factors, solved, scale, plan)
    dq, dk = _key_columns(inputs, d_factors, inverse_t, gated, scale, plan)
    return InputCotangents(dq, dk, solved.dv, gated.dg[..., 0, :], gated.dbeta[..., 0, :])
