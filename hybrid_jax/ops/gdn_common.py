"""Pieces shared by the chunked forms of the gated delta rule.

``chunk_factors`` does everything that is local to a chunk (gate cumsums, the WY/UT solve, the
intra-chunk attention); the chunk and associative-scan forms differ only in how the state is
carried across chunks.

Notation (per batch row, per head, per chunk of C positions, gamma = cumsum of g in the chunk):
  A[i, j]   = beta_i (k_i . k_j) exp(gamma_i - gamma_j)           for i > j, same segment
  (I + A) [u | w] = [beta * v | beta * exp(gamma) * k]             (unit lower triangular solve)
  v_new     = u - w S
  o         = scale * exp(gamma) * (q S) + P v_new,  P[i, j] = scale * (q_i . k_j) exp(gamma_i - gamma_j), i >= j
  S_next    = exp(gamma_C) S + (k * exp(gamma_C - gamma))^T v_new
Segment resets zero every term that would cross a segment start.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def dot(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation and full precision for float32 operands (no TF32)."""
    return jnp.einsum(subscripts, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


class ChunkFactors(NamedTuple):
    """Per-chunk quantities, all float32, laid out [B, H, N, C, ...]."""

    u: jax.Array  # [B, H, N, C, Dv]  state-independent part of v_new
    w: jax.Array  # [B, H, N, C, Dk]  v_new = u - w S
    q_decayed: jax.Array  # [B, H, N, C, Dk]  scale * exp(gamma) * q (zero after a reset)
    k_decayed: jax.Array  # [B, H, N, C, Dk]  exp(gamma_C - gamma) * k (zero before the last reset)
    intra: jax.Array  # [B, H, N, C, C]   P: the causal intra-chunk attention
    chunk_decay: jax.Array  # [B, H, N]  exp(gamma_C), zero when the chunk holds a reset


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C.

    Zero padding is inert: g = 0, beta = 0 and k = 0 leave the state unchanged.
    """
    b, t, h = x.shape[:3]
    pad = -t % chunk_size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // chunk_size, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padding."""
    b, h, n, c, d = x.shape
    return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)[:, :t]


def chunk_factors(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    reset: jax.Array | None,
    chunk_size: int,
) -> ChunkFactors:
    """Everything local to a chunk.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (float32 or bfloat16);
      g, beta: [B, T, H] float32; reset: [B, T] bool or None.
    """
    f32 = jnp.float32
    c = chunk_size
    q_c, k_c, v_c = (to_chunks(x, c) for x in (q, k, v))
    g_c, beta_c = (to_chunks(x.astype(f32), c) for x in (g, beta))  # [B, H, N, C]

    # Segment index inside the chunk (0 = still the segment the chunk started in).
    if reset is None:
        seg = jnp.zeros(g_c.shape[:1] + (1,) + g_c.shape[2:], jnp.int32)
    else:
        seg = to_chunks(reset[:, :, None].astype(jnp.int32), c)  # [B, 1, N, C]
        seg = jnp.cumsum(seg, axis=-1)
    same = seg[..., :, None] == seg[..., None, :]  # [B, 1, N, C, C]
    idx = jnp.arange(c)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]

    # decay_log[i, j] = sum_{j < t <= i} g_t, summed directly rather than as gamma_i - gamma_j:
    # a difference of two large cumsums loses the small decays next to strong ones.
    g_rows = jnp.where(strict, g_c[..., :, None], 0.0)  # [.., t, j] = g_t for t > j
    decay_log = jnp.cumsum(g_rows, axis=-2)  # [.., i, j]
    # Mask before exp: entries above the diagonal or across a reset never reach exp.
    pair_mask = causal & same
    decay = jnp.exp(jnp.where(pair_mask, decay_log, -jnp.inf))  # [B, H, N, C, C]

    gamma = jnp.cumsum(g_c, axis=-1)  # from chunk start
    first_seg = seg == 0
    last_seg = seg == seg[..., -1:]
    decay_from_start = jnp.where(first_seg, jnp.exp(gamma), 0.0)  # [B, H, N, C]
    decay_to_end = jnp.where(last_seg, jnp.exp(decay_log[..., -1, :]), 0.0)
    chunk_decay = jnp.where(first_seg[..., -1], jnp.exp(gamma[..., -1]), 0.0)  # [B, H, N]

    kk = dot("bhncd,bhnmd->bhncm", k_c, k_c)
    a = jnp.where(strict, beta_c[..., :, None] * kk * decay, 0.0)
    rhs = jnp.concatenate(
        [
            beta_c[..., None] * v_c.astype(f32),
            (beta_c * decay_from_start)[..., None] * k_c.astype(f32),
        ],
        axis=-1,
    )
    # Forward substitution on the unit lower triangular (I + A): exact, never a power series.
    eye = jnp.eye(c, dtype=f32)
    sol = jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)
    dv = v.shape[-1]
    u, w = sol[..., :dv], sol[..., dv:]

    qk = dot("bhncd,bhnmd->bhncm", q_c, k_c)
    intra = scale * qk * decay  # decay is already zero outside the causal same-segment pairs
    q_decayed = (scale * decay_from_start)[..., None] * q_c.astype(f32)
    k_decayed = decay_to_end[..., None] * k_c.astype(f32)
    return ChunkFactors(u, w, q_decayed, k_decayed, intra, chunk_decay)
