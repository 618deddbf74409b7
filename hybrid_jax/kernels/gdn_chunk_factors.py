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

Written for both Pallas backends: the chunk is the block on a parallel grid, and the
substitution uses only elementwise work and reductions (no [1, C] dots, which Triton rejects).
Verified in interpret mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *, scale: float):
    f32 = jnp.float32
    q, k, v = q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...].astype(f32)
    g, beta, seg = g_ref[...], beta_ref[...], seg_ref[...]  # [C, 1] each
    c = q.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal, strict = row >= col, row > col

    # decay_log[i, j] = sum_t [t <= i] g_t [t > j]; gamma[i] = sum_{t <= i} g_t;
    # to_end[j] = sum_{t > j} g_t.
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

    a = jnp.where(strict, beta * _mm(k, k.T) * decay, 0.0)
    # (I + A)^-1 by forward substitution: row i = e_i - A[i, :] X, where rows >= i of X are
    # still identity rows and A[i, j >= i] = 0. A[i, :] is taken as a column of A^T.
    eye = (row == col).astype(f32)

    def substitute(i, x):
        a_i = jnp.sum(jnp.where(col == i, a.T, 0.0), axis=1, keepdims=True)  # [C, 1]: A[i, j]
        new = jnp.where(col == i, 1.0, 0.0)[:1] - jnp.sum(a_i * x, axis=0, keepdims=True)
        return jnp.where(row == i, new, x)

    inv = jax.lax.fori_loop(1, c, substitute, eye)

    u_ref[...] = _mm(inv, beta * v)
    w_ref[...] = _mm(inv, beta * from_start * k)
    intra_ref[...] = scale * _mm(q, k.T) * decay
    qd_ref[...] = scale * from_start * q
    kd_ref[...] = to_end * k
    decay_ref[...] = jnp.where(seg_last == 0, jnp.exp(total), 0.0) * jnp.ones((1, 1), f32)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def chunk_factors_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                         beta: jax.Array, seg: jax.Array, *, scale: float, interpret=False):
    """Per-chunk factors for every chunk of every sequence.

    Args:
      q, k: [R, N, C, Dk]; v: [R, N, C, Dv] (float32 or bfloat16); g, beta: [R, N, C] float32;
      seg: [R, N, C] int32 segment index inside each chunk (all 0 without resets).
      interpret: True, or ``pltpu.InterpretParams`` (TPU semantics), to run on CPU.
    Returns:
      (u [R, N, C, Dv], w, q_decayed, k_decayed [R, N, C, Dk], intra [R, N, C, C],
      chunk_decay [R, N]), float32.
    """
    r, n, c, dk = q.shape
    dv = v.shape[-1]
    col = lambda x: x[..., None]  # [R, N, C] -> [R, N, C, 1]

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, *shape), lambda i, j: (i, j) + (0,) * len(shape))

    f32 = jnp.float32
    u, w, qd, kd, intra, decay = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        grid=(r, n),
        in_specs=[per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dv), per_chunk(c, 1),
                  per_chunk(c, 1), per_chunk(c, 1)],
        out_specs=[per_chunk(c, dv), per_chunk(c, dk), per_chunk(c, dk), per_chunk(c, dk),
                   per_chunk(c, c), per_chunk(1, 1)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dv), f32),
                   *[jax.ShapeDtypeStruct((r, n, c, dk), f32)] * 3,
                   jax.ShapeDtypeStruct((r, n, c, c), f32),
                   jax.ShapeDtypeStruct((r, n, 1, 1), f32)],
        interpret=interpret,
    )(q, k, v, col(g.astype(f32)), col(beta.astype(f32)), col(seg.astype(jnp.int32)))
    return u, w, qd, kd, intra, decay[..., 0, 0]
