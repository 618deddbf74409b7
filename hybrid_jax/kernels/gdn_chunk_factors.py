"""Pallas kernel: everything local to one chunk of the gated delta rule, fused.

One program per (sequence, chunk) computes, from the chunk's q, k, v, g, beta and segment
index, what the pass across chunks needs (``hybrid_jax.ops.gdn_common.ChunkFactors``):

    decay_log[i, j] = sum_{j < t <= i} g_t        (one matmul: summed directly, no cancellation)
    A = strict_tril(beta_i (k_i . k_j) exp(decay_log))   masked (causal, same segment) before exp
    T = (I + A)^-1                                 exact block inverses, doubled level by level
    u = T (beta v);  w = T (beta exp(gamma) k);  intra = scale (q k^T) exp(decay_log)
    q_decayed = scale exp(gamma) q;  k_decayed = exp(gamma_C - gamma) k;  chunk_decay = exp(gamma_C)

with segment resets zeroing every term that would cross a segment start. Its slow,
obviously-right twin is ``chunk_factors`` in XLA (tests compare the two).

Written for both Pallas backends: the chunk is the block on a parallel grid, and the solve
works on whole [C, C] tiles with masks (Triton lowers no slices, and rejects [1, C] dots).
The GPU variant (Triton lowering) ran on an H200 (experiments/RESULTS.md): at OLMo Hybrid's
layer the forward takes 0.59 ms (0.56 without any solve), the VJP 4.0 ms (2.7 without its
solve), far above what its memory traffic needs: it holds many [C, C] float32 tiles at once
and most likely spills registers; splitting it in two, as FLA does, is the next step. The TPU
variant is verified in interpret mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import (
    BLOCK_COLUMNS,
    column_blocks,
    compiler_params,
    dot_dtype,
    mm_exact_mask,
    solve_matmul,
)
from hybrid_jax.kernels.common import mm as _mm


def _unit_lower_inverse(a: jax.Array, row: jax.Array, col: jax.Array, matmul) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [C, C] (C a power of two), float32: the twin
    of ``gdn_common.unit_lower_inverse``.

    Recursive doubling of exact block inverses, all on whole [C, C] tiles with masks (Triton
    lowers no slices): X starts as the inverse of I + A's 2x2 diagonal blocks, then each level
    inverts the diagonal blocks twice as large from the two halves' inverses,

        [[D1, 0], [L, D2]]^-1 = [[D1^-1, 0], [-D2^-1 L D1^-1, D2^-1]]:  X <- X - (X L) X,

    with L the next level's off-diagonal block (X is block diagonal, so one pair of [C, C]
    matmuls does every block). log2(C) - 1 levels (10 matmuls for C = 64) replace C - 1
    sequential substitution steps, and no intermediate exceeds the inverse's own entries (no
    power series, which overflows for large |A|). ``matmul`` is ``common.solve_matmul``: three
    bf16 passes for 16-bit inputs, float32 otherwise.
    """
    c = a.shape[0]
    if c & (c - 1):
        raise ValueError(f"chunk size must be a power of two for the kernels, got {c}")
    block = lambda x, level: jax.lax.shift_right_logical(x, jnp.int32(level))
    x = jnp.where(row == col, 1.0, 0.0) - jnp.where(block(row, 1) == block(col, 1), a, 0.0)
    level = 2
    while (1 << level) <= c:
        off = (block(row, level) == block(col, level)) & (
            block(row, level - 1) != block(col, level - 1))
        x = x - matmul(matmul(x, jnp.where(off, a, 0.0)), x)
        level += 1
    return x


def _gates(g, seg, row, col):
    """From a chunk's log gates g [C, 1] and segment indices seg [C, 1] (float32 / int32):
    (decay [C, C], from_start [C, 1], to_end [C, 1], chunk_decay [1, 1], masks), all float32.

    decay_log[i, j] = sum_t [t <= i] g_t [t > j] (one matmul: summed directly, no
    cancellation); gamma[i] = sum_{t <= i} g_t; to_end[j] = sum_{t > j} g_t. Every exp is
    masked first: pairs across a segment start, positions outside the first (last) segment.
    """
    f32 = jnp.float32
    causal, strict = row >= col, row > col
    decay_log = mm_exact_mask(jnp.where(causal, g.T, 0.0), strict)
    gamma = jnp.sum(jnp.where(causal, g.T, 0.0), axis=1, keepdims=True)  # [C, 1]
    to_end_log = jnp.sum(jnp.where(strict, g, 0.0), axis=0, keepdims=True).T  # [C, 1]
    seg_last = jnp.max(seg)  # segment indices only grow along a chunk
    pair = causal & (seg == seg.T)
    first, last = seg == 0, seg == seg_last
    decay = jnp.exp(jnp.where(pair, decay_log, -jnp.inf))
    from_start = jnp.where(first, jnp.exp(jnp.where(first, gamma, 0.0)), 0.0)
    to_end = jnp.where(last, jnp.exp(jnp.where(last, to_end_log, 0.0)), 0.0)
    chunk_decay = jnp.where(seg_last == 0, jnp.exp(jnp.sum(g)), 0.0) * jnp.ones((1, 1), f32)
    return decay, from_start, to_end, chunk_decay


def _iotas(c: int):
    return (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0),
            jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _products_and_inverse(q_ref, k_ref, beta, decay, row, col, width: int):
    """(q k^T, k k^T, (I + A)^-1) [C, C] float32, A = strict_tril(beta_i (k_i . k_j) decay_ij),
    the products summed over blocks of ``width`` key columns (operands in the inputs' dtype)."""
    qk = kk = 0.0
    for cols in column_blocks(k_ref.shape[-1], width):
        q, k = q_ref[:, cols], k_ref[:, cols]
        qk, kk = qk + _mm(q, k.T), kk + _mm(k, k.T)
    a = jnp.where(row > col, beta * kk * decay, 0.0)
    return qk, kk, _unit_lower_inverse(a, row, col, solve_matmul(k_ref.dtype))


def _kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *, scale: float, width: int):
    f32 = jnp.float32
    dt = u_ref.dtype  # matmul operand dtype: the inputs' (bf16) or float32
    beta = beta_ref[...]  # [C, 1]
    row, col = _iotas(q_ref.shape[0])
    decay, from_start, to_end, chunk_decay = _gates(g_ref[...], seg_ref[...], row, col)
    qk, _, inv = _products_and_inverse(q_ref, k_ref, beta, decay, row, col, width)

    # Head dims in blocks of ``width`` columns: whole [C, 256] float32 tiles would not fit a
    # GPU program's registers.
    for cols in column_blocks(v_ref.shape[-1], width):
        u_ref[:, cols] = _mm(inv, beta * v_ref[:, cols].astype(f32), dt).astype(dt)
    for cols in column_blocks(k_ref.shape[-1], width):
        k = k_ref[:, cols].astype(f32)
        w_ref[:, cols] = _mm(inv, beta * from_start * k, dt).astype(dt)
        qd_ref[:, cols] = (scale * from_start * q_ref[:, cols].astype(f32)).astype(dt)
        kd_ref[:, cols] = (to_end * k).astype(dt)
    intra_ref[...] = (scale * qk * decay).astype(dt)
    decay_ref[...] = chunk_decay


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
                     du_ref, dw_ref, dqd_ref, dkd_ref, dintra_ref, ddecay_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, scale: float, width: int):
    """The vector-Jacobian product of ``_kernel``, recomputing the chunk's gates and solve.
    Cotangents and results are float32; matmuls over head dims take the inputs' dtype, the
    [C, C] ones through the solve ``common.solve_matmul``. Head dims go in blocks of ``width``
    columns: first the [C, C] cotangents' sums over them, then each block's results."""
    f32 = jnp.float32
    dt = dot_dtype(q_ref.dtype)
    sum_cols = lambda x: jnp.sum(x, axis=1, keepdims=True)
    g, beta = g_ref[...], beta_ref[...]
    row, col = _iotas(q_ref.shape[0])
    causal, strict = row >= col, row > col
    decay, from_start, to_end, chunk_decay = _gates(g, seg_ref[...], row, col)
    qk, kk, inv = _products_and_inverse(q_ref, k_ref, beta, decay, row, col, width)

    # u = T (beta v), w = T (beta from_start k): d_inv sums over every value and key column.
    d_inv = dbeta = d_from_start = d_to_end = 0.0
    for cols in column_blocks(v_ref.shape[-1], width):
        v, du = v_ref[:, cols].astype(f32), du_ref[:, cols]
        d_inv = d_inv + _mm(du, (beta * v).T, dt)
        d_bv = _mm(inv.T, du, dt)
        dv_ref[:, cols] = beta * d_bv
        dbeta = dbeta + sum_cols(v * d_bv)
    for cols in column_blocks(k_ref.shape[-1], width):
        q, k, dw = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32), dw_ref[:, cols]
        d_inv = d_inv + _mm(dw, (beta * from_start * k).T, dt)
        k_d_bk = sum_cols(k * _mm(inv.T, dw, dt))
        dbeta = dbeta + from_start * k_d_bk
        d_from_start = d_from_start + beta * k_d_bk + scale * sum_cols(q * dqd_ref[:, cols])
        d_to_end = d_to_end + sum_cols(k * dkd_ref[:, cols])
    # T = (I + A)^-1: dA = -T^T dT T^T, on A's strictly lower support.
    solve_mm = solve_matmul(q_ref.dtype)
    d_a = jnp.where(strict, -solve_mm(inv.T, solve_mm(d_inv, inv.T)), 0.0)
    # A = beta_i kk_ij decay_ij; intra = scale qk_ij decay_ij.
    d_kk = beta * d_a * decay
    d_kk = d_kk + d_kk.T
    dbeta = dbeta + sum_cols(d_a * kk * decay)
    d_intra = dintra_ref[...]
    d_decay = beta * d_a * kk + scale * d_intra * qk
    d_qk = scale * d_intra * decay
    for cols in column_blocks(k_ref.shape[-1], width):
        q, k = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32)
        dq_ref[:, cols] = _mm(d_qk, k, dt) + scale * from_start * dqd_ref[:, cols]
        d_bk = _mm(inv.T, dw_ref[:, cols], dt)  # again: cheaper than keeping it live
        dk_ref[:, cols] = (beta * from_start * d_bk + _mm(d_qk.T, q, dt) + _mm(d_kk, k, dt)
                           + to_end * dkd_ref[:, cols])

    # The gates, through each masked exp (decay, from_start, to_end and chunk_decay are zero
    # wherever masked, so their cotangents vanish there).
    d_log = d_decay * decay  # d decay_log[i, j]; decay_log[i, j] sums g_t over j < t <= i
    per_t = mm_exact_mask(d_log, row < col)  # [i, t] = sum_{j < t} d_log[i, j]
    dg = jnp.sum(jnp.where(causal, per_t, 0.0), axis=0, keepdims=True).T  # sum over i >= t
    d_gamma = d_from_start * from_start  # gamma[i] sums g_t over t <= i
    dg = dg + jnp.sum(jnp.where(causal, d_gamma, 0.0), axis=0, keepdims=True).T
    d_to_end_log = (d_to_end * to_end).T  # [1, C]; to_end_log[j] sums g_t over t > j
    dg = dg + jnp.sum(jnp.where(strict, d_to_end_log, 0.0), axis=1, keepdims=True)
    dg = dg + ddecay_ref[...] * chunk_decay

    dg_ref[...] = dg
    dbeta_ref[...] = dbeta


@functools.partial(jax.jit, static_argnames=("scale", "backend", "interpret"))
def chunk_factors_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                         beta: jax.Array, seg: jax.Array, *, scale: float, backend: str = "gpu",
                         interpret=False):
    """Per-chunk factors for every chunk of every sequence.

    Args:
      q, k: [R, N, C, Dk]; v: [R, N, C, Dv] (float32 or bfloat16); g, beta: [R, N, C] float32;
      seg: [R, N, C] int32 segment index inside each chunk (all 0 without resets).
      backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU), see ``common.compiler_params``.
      interpret: True, or ``pltpu.InterpretParams`` (TPU semantics), to run on CPU.
    Returns:
      (u [R, N, C, Dv], w, q_decayed, k_decayed [R, N, C, Dk], intra [R, N, C, C]) in the
      matmul operand dtype (``common.dot_dtype(q.dtype)``: bf16 for bf16 inputs, else
      float32), and chunk_decay [R, N] float32. Everything before (gates, decays, the solve)
      is float32.
    """
    r, n, c, dk = q.shape
    dv = v.shape[-1]
    col = lambda x: x[..., None]  # [R, N, C] -> [R, N, C, 1]

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, *shape), lambda i, j: (i, j) + (0,) * len(shape))

    f32, dt = jnp.float32, dot_dtype(q.dtype)
    u, w, qd, kd, intra, decay = pl.pallas_call(
        functools.partial(_kernel, scale=scale, width=BLOCK_COLUMNS[backend]),
        grid=(r, n),
        in_specs=[per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dv), per_chunk(c, 1),
                  per_chunk(c, 1), per_chunk(c, 1)],
        out_specs=[per_chunk(c, dv), per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dk),
                   per_chunk(c, c), per_chunk(1, 1)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dv), dt),
                   *[jax.ShapeDtypeStruct((r, n, c, dk), dt)] * 3,
                   jax.ShapeDtypeStruct((r, n, c, c), dt),
                   jax.ShapeDtypeStruct((r, n, 1, 1), f32)],
        compiler_params=compiler_params(backend, ("parallel", "parallel")),
        interpret=interpret,
    )(q, k, v, col(g.astype(f32)), col(beta.astype(f32)), col(seg.astype(jnp.int32)))
    return u, w, qd, kd, intra, decay[..., 0, 0]


@functools.partial(jax.jit, static_argnames=("scale", "backend", "interpret"))
def chunk_factors_backward_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                                  beta: jax.Array, seg: jax.Array, d_u: jax.Array,
                                  d_w: jax.Array, d_q_decayed: jax.Array, d_k_decayed: jax.Array,
                                  d_intra: jax.Array, d_chunk_decay: jax.Array, *, scale: float,
                                  backend: str = "gpu", interpret=False):
    """The VJP of ``chunk_factors_kernel``: recomputes each chunk's gates and solve (nothing was
    stored) and returns (dq, dk [R, N, C, Dk], dv [R, N, C, Dv], dg, dbeta [R, N, C]),
    float32. Inputs as for ``chunk_factors_kernel``; the cotangents have the factors' shapes
    (any float dtype; used as float32)."""
    r, n, c, dk = q.shape
    dv = v.shape[-1]
    f32 = jnp.float32
    col = lambda x: x[..., None]  # [R, N, C] -> [R, N, C, 1]

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, *shape), lambda i, j: (i, j) + (0,) * len(shape))

    dq, dk_, dv_, dg, dbeta = pl.pallas_call(
        functools.partial(_backward_kernel, scale=scale, width=BLOCK_COLUMNS[backend]),
        grid=(r, n),
        in_specs=[per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dv), per_chunk(c, 1),
                  per_chunk(c, 1), per_chunk(c, 1),
                  per_chunk(c, dv), per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dk),
                  per_chunk(c, c), per_chunk(1, 1)],
        out_specs=[per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dv), per_chunk(c, 1),
                   per_chunk(c, 1)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dk), f32),
                   jax.ShapeDtypeStruct((r, n, c, dk), f32),
                   jax.ShapeDtypeStruct((r, n, c, dv), f32),
                   jax.ShapeDtypeStruct((r, n, c, 1), f32),
                   jax.ShapeDtypeStruct((r, n, c, 1), f32)],
        compiler_params=compiler_params(backend, ("parallel", "parallel")),
        interpret=interpret,
    )(q, k, v, col(g.astype(f32)), col(beta.astype(f32)), col(seg.astype(jnp.int32)),
      *(x.astype(f32) for x in (d_u, d_w, d_q_decayed, d_k_decayed, d_intra)),
      d_chunk_decay.astype(f32)[..., None, None])
    return dq, dk_, dv_, dg[..., 0], dbeta[..., 0]
