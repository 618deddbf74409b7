"""The gated delta rule with a log-depth ``jax.lax.associative_scan`` across chunks.

Each chunk is an affine map of the state entering it, S -> M S + X with
M = exp(gamma_C) I - (k * exp(gamma_C - gamma))^T w and X = (k * exp(gamma_C - gamma))^T u.
Composing maps is associative, so all chunk-entry states come from a parallel prefix scan at the
price of [Dk, Dk] x [Dk, Dk] products: more FLOPs, less sequential depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.chunk_factors import chunk_factors, chunk_segments, dot, from_chunks, to_chunks


def _compose(earlier, later):
    """(M2, X2) after (M1, X1): S -> M2 (M1 S + X1) + X2."""
    m1, x1 = earlier
    m2, x2 = later
    return dot("...ij,...jk->...ik", m2, m1), dot("...ij,...jv->...iv", m2, x1) + x2


def gdn_assoc_scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``gdn_chunk``; the cross-chunk recurrence is an associative scan.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H] float32;
      initial_state: [B, H, Dk, Dv] float32; reset: [B, T] bool or None.
    Returns:
      (o [B, T, H, Dv] float32, final state [B, H, Dk, Dv] float32).
    """
    t = q.shape[1]
    xs = tuple(to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [N, B, H, C, ...]
    f = chunk_factors(*xs, chunk_segments(reset, chunk_size), scale)
    dk = k.shape[-1]
    eye = jnp.eye(dk, dtype=jnp.float32)
    m = f.chunk_decay[..., None, None] * eye - dot("nbhck,nbhcj->nbhkj", f.k_decayed, f.w)
    x = dot("nbhck,nbhcv->nbhkv", f.k_decayed, f.u)
    m_cum, x_cum = jax.lax.associative_scan(_compose, (m, x), axis=0)
    # State after chunk n: (M_n ... M_0) S0 + X_cum_n.
    after = dot("nbhkj,bhjv->nbhkv", m_cum, initial_state) + x_cum  # [N, B, H, Dk, Dv]
    entering = jnp.concatenate([initial_state[None], after[:-1]], axis=0)
    v_new = f.u - dot("nbhck,nbhkv->nbhcv", f.w, entering)
    o = dot("nbhck,nbhkv->nbhcv", f.q_decayed, entering) + dot("nbhcm,nbhmv->nbhcv", f.intra, v_new)
    return from_chunks(o, t), after[-1]
