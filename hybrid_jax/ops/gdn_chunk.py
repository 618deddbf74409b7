"""The chunked (WY/UT) gated delta rule: per-chunk solves, then a sequential scan over chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops.gdn_common import chunk_factors, chunk_segments, dot, from_chunks, to_chunks


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
    xs = tuple(to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [N, B, H, C, ...]
    seg = chunk_segments(reset, chunk_size)

    def step(state, x):
        *inputs, seg_n = x
        # Factors are computed per chunk inside the scan: the chunk's working set stays in
        # cache, which on CPU beats precomputing [N, ...] arrays in separate memory passes.
        f = chunk_factors(*inputs, seg_n, scale)
        v_new = f.u - dot("bhck,bhkv->bhcv", f.w, state)
        o = dot("bhck,bhkv->bhcv", f.q_decayed, state) + dot("bhcm,bhmv->bhcv", f.intra, v_new)
        state = f.chunk_decay[..., None, None] * state + dot("bhck,bhcv->bhkv", f.k_decayed, v_new)
        return state, o

    # Backward recomputes each chunk's factors from its inputs instead of storing them.
    step = jax.checkpoint(step, prevent_cse=False)
    final, o = jax.lax.scan(step, initial_state, (*xs, seg))
    return from_chunks(o, t), final
