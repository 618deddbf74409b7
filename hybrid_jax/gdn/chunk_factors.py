"""Everything local to a chunk of the gated delta rule, in XLA: shared by the chunked forms,
and the twin of the Pallas factor kernel (``pallas/chunk_factors.py``).

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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def dot(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation and full precision for float32 operands (no TF32)."""
    return jnp.einsum(subscripts, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unit_lower_inverse(a: jax.Array, block: int = 16) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [..., C, C], by forward substitution
    (``substitution_inverse``), with the inverse's own derivative as its VJP:
    dA = -T^T dT T^T on A's strictly lower support, two matmuls, rather than autodiff through
    the substitution's sequential row updates; the twin test compares the two."""
    return substitution_inverse(a, block)


def _inverse_fwd(a: jax.Array, block: int):
    inv = substitution_inverse(a, block)
    return inv, inv


def _inverse_bwd(block: int, inv: jax.Array, d_inv: jax.Array):
    del block
    c = inv.shape[-1]
    strict = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]
    inv_t = jnp.swapaxes(inv, -1, -2)
    d_a = -dot("...ij,...jk->...ik", dot("...ij,...jk->...ik", inv_t, d_inv), inv_t)
    return (jnp.where(strict, d_a, 0.0).astype(inv.dtype),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def substitution_inverse(a: jax.Array, block: int = 16) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [..., C, C], by forward substitution.

    Exact (no power series, which overflows for large |A|). The diagonal blocks of size
    ``block`` are inverted row by row; then blocks are merged pairwise with
    [[X11, 0], [A21, I + A22]]^-1 = [[X11^-1, 0], [-X22^-1 A21 X11^-1, X22^-1]], all matmuls.
    Requires C to be ``block`` times a power of two, or C <= block.
    """
    c = a.shape[-1]
    block = min(block, c)
    nb = c // block
    if nb * block != c or nb & (nb - 1):
        raise ValueError(f"substitution_inverse: size {c} is not {block} times a power of two")
    lead = a.shape[:-2]
    # Diagonal blocks [..., nb, block, block].
    ab = a.reshape(*lead, nb, block, nb, block)
    diag = jnp.stack([ab[..., i, :, i, :] for i in range(nb)], axis=-3)
    eye = jnp.eye(block, dtype=a.dtype)
    x = jnp.broadcast_to(eye, diag.shape)
    for i in range(1, block):
        # Row i of the inverse: e_i - A[i, :i] X[:i, :] (A[i, j>=i] is zero).
        row = eye[i] - jnp.einsum("...j,...jk->...k", diag[..., i, :], x, precision=HIGHEST)
        x = x.at[..., i, :].set(row)
    x = x.reshape(*lead, nb * block, block)  # blocks stacked down the rows
    size = block
    inv = [x[..., i * block:(i + 1) * block, :] for i in range(nb)]
    while len(inv) > 1:
        merged = []
        for j in range(0, len(inv), 2):
            r0 = j * size  # row/col offset of the pair
            a21 = a[..., r0 + size:r0 + 2 * size, r0:r0 + size]
            x11, x22 = inv[j], inv[j + 1]
            x21 = -dot("...ij,...jk->...ik", x22, dot("...ij,...jk->...ik", a21, x11))
            top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
            bottom = jnp.concatenate([x21, x22], axis=-1)
            merged.append(jnp.concatenate([top, bottom], axis=-2))
        inv = merged
        size *= 2
    return inv[0]


class ChunkFactors(NamedTuple):
    """Per-chunk quantities, all float32, laid out [..., H, C, ...] (any leading axes)."""

    u: jax.Array  # [..., H, C, Dv]  state-independent part of v_new
    w: jax.Array  # [..., H, C, Dk]  v_new = u - w S
    q_decayed: jax.Array  # [..., H, C, Dk]  scale * exp(gamma) * q (zero after a reset)
    k_decayed: jax.Array  # [..., H, C, Dk]  exp(gamma_C - gamma) * k (zero before the last reset)
    intra: jax.Array  # [..., H, C, C]   P: the causal intra-chunk attention
    chunk_decay: jax.Array  # [..., H]  exp(gamma_C), zero when the chunk holds a reset


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] -> chunk-major [N, B, H, C, ...], zero-padding T to a multiple of C.

    Zero padding is inert: g = 0, beta = 0 and k = 0 leave the state unchanged.
    """
    b, t, h = x.shape[:3]
    pad = -t % chunk_size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // chunk_size, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def from_chunks(x: jax.Array, t: int) -> jax.Array:
    """Chunk-major [N, B, H, C, D] -> [B, T, H, D], dropping the padding."""
    n, b, h, c, d = x.shape
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, n * c, h, d)[:, :t]


def chunk_segments(reset: jax.Array | None, chunk_size: int) -> jax.Array | None:
    """[B, T] reset flags -> [N, B, 1, C] segment index inside each chunk (0 = the segment the
    chunk started in), or None when there are no resets."""
    if reset is None:
        return None
    seg = to_chunks(reset[:, :, None].astype(jnp.int32), chunk_size)
    return jnp.cumsum(seg, axis=-1)


def chunk_factors(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    seg: jax.Array | None,
    scale: float,
) -> ChunkFactors:
    """Everything local to a chunk, for any number of chunks at once.

    Args:
      q, k: [..., H, C, Dk]; v: [..., H, C, Dv] (float32 or bfloat16);
      g, beta: [..., H, C] float32; seg: [..., 1, C] int segment index in the chunk, or None.
    """
    f32 = jnp.float32
    c = q.shape[-2]
    idx = jnp.arange(c)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]

    # decay_log[i, j] = sum_{j < t <= i} g_t, summed directly rather than as gamma_i - gamma_j:
    # a difference of two large cumsums loses the small decays next to strong ones.
    # Both sums are matmuls against the 0/1 matrix ``causal``: XLA:CPU lowers cumsum to a
    # cascade of reduce-windows, far slower in the train step.
    g_rows = jnp.where(strict, g[..., :, None], 0.0)  # [.., t, j] = g_t for t > j
    ones_to = causal.astype(jnp.float32)  # [i, t] = 1 for t <= i
    decay_log = dot("it,...tj->...ij", ones_to, g_rows)  # [.., i, j]
    gamma = dot("...t,it->...i", g, ones_to)  # from chunk start
    # Mask before exp: entries above the diagonal or across a reset never reach exp.
    if seg is None:
        pair_mask = causal
        decay_from_start = jnp.exp(gamma)
        decay_to_end = jnp.exp(decay_log[..., -1, :])
        chunk_decay = jnp.exp(gamma[..., -1])
    else:
        pair_mask = causal & (seg[..., :, None] == seg[..., None, :])
        first_seg = seg == 0
        last_seg = seg == seg[..., -1:]
        decay_from_start = jnp.where(first_seg, jnp.exp(gamma), 0.0)
        decay_to_end = jnp.where(last_seg, jnp.exp(decay_log[..., -1, :]), 0.0)
        chunk_decay = jnp.where(first_seg[..., -1], jnp.exp(gamma[..., -1]), 0.0)
    decay = jnp.exp(jnp.where(pair_mask, decay_log, -jnp.inf))  # [..., C, C]

    kk = dot("...cd,...md->...cm", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
    inv = unit_lower_inverse(a)
    # Two products rather than one on concatenated right-hand sides: narrower outputs keep
    # XLA:CPU on its fast batched-matmul path.
    u = dot("...ij,...jd->...id", inv, beta[..., None] * v.astype(f32))
    w = dot("...ij,...jd->...id", inv, (beta * decay_from_start)[..., None] * k.astype(f32))

    intra = scale * dot("...cd,...md->...cm", q, k) * decay  # decay is zero outside causal pairs
    q_decayed = (scale * decay_from_start)[..., None] * q.astype(f32)
    k_decayed = decay_to_end[..., None] * k.astype(f32)
    return ChunkFactors(u, w, q_decayed, k_decayed, intra, chunk_decay)
