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
The GPU variant (Triton lowering) ran on an H200 (experiments/RESULTS.md); the TPU variant is
verified in interpret mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import compiler_params, dot_dtype, mm_exact_mask, solve_matmul
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


def _keys_and_inverse(k, beta, decay, row, col):
    """(k k^T, (I + A)^-1) in float32, A = strict_tril(beta_i (k_i . k_j) decay_ij)."""
    kk = _mm(k, k.T)
    a = jnp.where(row > col, beta * kk * decay, 0.0)
    return kk, _unit_lower_inverse(a, row, col, solve_matmul(k.dtype))


def _kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *, scale: float):
    f32 = jnp.float32
    dt = u_ref.dtype  # matmul operand dtype: the inputs' (bf16) or float32
    beta = beta_ref[...]  # [C, 1]
    row, col = _iotas(q_ref.shape[0])
    decay, from_start, to_end, chunk_decay = _gates(g_ref[...], seg_ref[...], row, col)

    q_in, k_in = q_ref[...], k_ref[...]  # the inputs' dtype, for the [C, C] products
    _, inv = _keys_and_inverse(k_in, beta, decay, row, col)

    q, k, v = q_in.astype(f32), k_in.astype(f32), v_ref[...].astype(f32)
    u_ref[...] = _mm(inv, beta * v, dt).astype(dt)
    w_ref[...] = _mm(inv, beta * from_start * k, dt).astype(dt)
    intra_ref[...] = (scale * _mm(q_in, k_in.T) * decay).astype(dt)
    qd_ref[...] = (scale * from_start * q).astype(dt)
    kd_ref[...] = (to_end * k).astype(dt)
    decay_ref[...] = chunk_decay


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
                     du_ref, dw_ref, dqd_ref, dkd_ref, dintra_ref, ddecay_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, scale: float):
    """The vector-Jacobian product of ``_kernel``, recomputing the chunk's gates and solve.
    Cotangents and results are float32; matmuls over head dims take the inputs' dtype, the
    [C, C] ones through the solve stay float32."""
    f32 = jnp.float32
    dt = dot_dtype(q_ref.dtype)
    g, beta = g_ref[...], beta_ref[...]
    row, col = _iotas(q_ref.shape[0])
    causal, strict = row >= col, row > col
    decay, from_start, to_end, chunk_decay = _gates(g, seg_ref[...], row, col)
    q_in, k_in = q_ref[...], k_ref[...]
    q, k, v = q_in.astype(f32), k_in.astype(f32), v_ref[...].astype(f32)
    kk, inv = _keys_and_inverse(k_in, beta, decay, row, col)
    qk = _mm(q_in, k_in.T)
    du, dw, dqd, dkd = du_ref[...], dw_ref[...], dqd_ref[...], dkd_ref[...]

    # u = T (beta v), w = T (beta from_start k).
    b_v, b_k = beta * v, beta * from_start * k
    d_inv = _mm(du, b_v.T, dt) + _mm(dw, b_k.T, dt)  # [C, C]
    d_bv, d_bk = _mm(inv.T, du, dt), _mm(inv.T, dw, dt)
    dv = beta * d_bv
    dk = beta * from_start * d_bk
    dbeta = (jnp.sum(v * d_bv, axis=1, keepdims=True)
             + from_start * jnp.sum(k * d_bk, axis=1, keepdims=True))
    d_from_start = beta * jnp.sum(k * d_bk, axis=1, keepdims=True)
    # T = (I + A)^-1: dA = -T^T dT T^T, on A's strictly lower support.
    solve_mm = solve_matmul(q_ref.dtype)
    d_a = jnp.where(strict, -solve_mm(inv.T, solve_mm(d_inv, inv.T)), 0.0)
    # A = beta_i kk_ij decay_ij; intra = scale qk_ij decay_ij.
    d_kk = beta * d_a * decay
    dbeta = dbeta + jnp.sum(d_a * kk * decay, axis=1, keepdims=True)
    d_intra = dintra_ref[...]
    d_decay = beta * d_a * kk + scale * d_intra * qk
    d_qk = scale * d_intra * decay
    dq = _mm(d_qk, k, dt) + scale * from_start * dqd
    dk = dk + _mm(d_qk.T, q, dt) + _mm(d_kk + d_kk.T, k, dt) + to_end * dkd
    d_from_start = d_from_start + scale * jnp.sum(q * dqd, axis=1, keepdims=True)
    d_to_end = jnp.sum(k * dkd, axis=1, keepdims=True)

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

    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
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
        functools.partial(_kernel, scale=scale),
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
        functools.partial(_backward_kernel, scale=scale),
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
