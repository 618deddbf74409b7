"""Pallas kernel: everything local to one chunk of the gated delta rule, fused.

One program per (sequence, chunk) computes, from the chunk's q, k, v, g, beta and segment
index, what the pass across chunks needs (``hybrid_jax.ops.gdn_common.ChunkFactors``):

    decay_log[i, j] = sum_{j < t <= i} g_t        (one matmul: summed directly, no cancellation)
    A = strict_tril(beta_i (k_i . k_j) exp(decay_log))   masked (causal, same segment) before exp
    T = (I + A)^-1                                 forward substitution, row by row, never a series
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

from hybrid_jax.kernels.common import compiler_params, dot_dtype
from hybrid_jax.kernels.common import mm as _mm


def _unit_lower_inverse(a: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [C, C], float32, exact (no power series, which
    overflows for large |A|): the twin of ``gdn_common.unit_lower_inverse``.

    Forward substitution, one row per step: row i = e_i - A[i, :] X, where rows >= i of X are
    still identity rows and A[i, j >= i] = 0. Only masked elementwise work and reductions on
    whole [C, C] tiles (Triton lowers no slices and rejects [1, C] dots); A[i, :] is read as a
    column of A^T. A blocked form (16-row diagonal blocks substituted together, then merged by
    matmuls, as the XLA twin does) measured 3x slower on an H200: Triton runs float32 dots
    without tensor cores, and the solve must stay float32.
    """
    c = a.shape[0]
    a_t = a.T
    col_1 = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)

    def substitute(i, x):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)  # [C, 1]: A[i, j]
        new = jnp.where(col_1 == i, 1.0, 0.0) - jnp.sum(a_i * x, axis=0, keepdims=True)
        return jnp.where(row == i, new, x)

    return jax.lax.fori_loop(1, c, substitute, (row == col).astype(jnp.float32))


def _kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *, scale: float):
    f32 = jnp.float32
    dt = u_ref.dtype  # matmul operand dtype: the inputs' (bf16) or float32
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    g, beta, seg = g_ref[...], beta_ref[...], seg_ref[...]  # [C, 1] each
    c = q.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal, strict = row >= col, row > col

    # decay_log[i, j] = sum_t [t <= i] g_t [t > j]; gamma[i] = sum_{t <= i} g_t;
    # to_end[j] = sum_{t > j} g_t. All float32.
    decay_log = _mm(jnp.where(causal, g.T, 0.0), strict.astype(f32))
    gamma = jnp.sum(jnp.where(causal, g.T, 0.0), axis=1, keepdims=True)  # [C, 1]
    to_end = jnp.sum(jnp.where(row > col, g, 0.0), axis=0, keepdims=True).T  # [C, 1]
    total = jnp.sum(g)

    seg_last = jnp.max(seg)  # segment indices only grow along a chunk
    pair = causal & (seg == seg.T)
    first, last = seg == 0, seg == seg_last
    decay = jnp.exp(jnp.where(pair, decay_log, -jnp.inf))  # masked before exp
    from_start = jnp.where(first, jnp.exp(jnp.where(first, gamma, 0.0)), 0.0)
    to_end = jnp.where(last, jnp.exp(to_end), 0.0)

    a = jnp.where(strict, beta * _mm(k, k.T) * decay, 0.0)  # float32
    inv = _unit_lower_inverse(a, row, col)

    q, k = q.astype(f32), k.astype(f32)
    u_ref[...] = _mm(inv, beta * v.astype(f32), dt).astype(dt)
    w_ref[...] = _mm(inv, beta * from_start * k, dt).astype(dt)
    intra_ref[...] = (scale * _mm(q_ref[...], k_ref[...].T) * decay).astype(dt)
    qd_ref[...] = (scale * from_start * q).astype(dt)
    kd_ref[...] = (to_end * k).astype(dt)
    decay_ref[...] = jnp.where(seg_last == 0, jnp.exp(total), 0.0) * jnp.ones((1, 1), f32)


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
