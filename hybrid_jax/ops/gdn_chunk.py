"""The chunked (WY/UT) gated delta rule: per-chunk solves, then a sequential scan over chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops.gdn_common import chunk_factors, dot, from_chunks


def gdn_chunk(
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
    """Chunked form: work inside a chunk is matmuls; only the [Dk, Dv] state crosses chunks.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H] float32;
      initial_state: [B, H, Dk, Dv] float32; reset: [B, T] bool or None.
    Returns:
      (o [B, T, H, Dv] float32, final state [B, H, Dk, Dv] float32).
    """
    t = q.shape[1]
    f = chunk_factors(q, k, v, g, beta, scale, reset, chunk_size)
    # Chunk axis first for the scan.
    xs = tuple(jnp.moveaxis(x, 2, 0) for x in f)

    def step(state, x):
        u, w, q_decayed, k_decayed, intra, chunk_decay = x
        v_new = u - dot("bhck,bhkv->bhcv", w, state)
        o = dot("bhck,bhkv->bhcv", q_decayed, state) + dot("bhcm,bhmv->bhcv", intra, v_new)
        state = chunk_decay[..., None, None] * state + dot("bhck,bhcv->bhkv", k_decayed, v_new)
        return state, o

    final, o = jax.lax.scan(step, initial_state, xs)
    return from_chunks(jnp.moveaxis(o, 0, 2), t), final
