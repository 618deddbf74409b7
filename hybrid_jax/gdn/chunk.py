"""The chunked (WY/UT) gated delta rule: per-chunk solves, then a sequential scan over chunks."""

from __future__ import annotations

import jax

from hybrid_jax.gdn.chunk_factors import (
    ChunkFactors,
    chunk_factors,
    chunk_segments,
    dot,
    from_chunks,
    to_chunks,
)


def chunk_state_step(state: jax.Array, f: ChunkFactors) -> tuple[jax.Array, jax.Array]:
    """One chunk of the pass across chunks, in float32: the state S entering it
    [B, H, Dk, Dv] and its factors ([B, H, C, ...], ``chunk_factors``) in; (the state
    leaving it, o [B, H, C, Dv]) out:

        v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay S + k_decayed^T v_new

    A ``lax.scan`` step; the twin of the Pallas state passes (``pallas.state_step``).
    """
    v_new = f.u - dot("bhck,bhkv->bhcv", f.w, state)
    o = dot("bhck,bhkv->bhcv", f.q_decayed, state) + dot("bhcm,bhmv->bhcv", f.intra, v_new)
    state = f.chunk_decay[..., None, None] * state + dot("bhck,bhcv->bhkv", f.k_decayed, v_new)
    return state, o


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
    factors_in_scan: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked form: work inside a chunk is matmuls; only the [Dk, Dv] state crosses chunks.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H] float32;
      initial_state: [B, H, Dk, Dv] float32; reset: [B, T] bool or None.
      factors_in_scan: compute each chunk's factors inside the scan step (True) or for all
        chunks at once before it (False). None picks True on CPU, where a chunk's working set
        stays in cache (experiments/bench_gdn.py times chunk_in_scan against chunk_batched),
        and False on accelerators, where one batched pass over all chunks keeps them busy.
    Returns:
      (o [B, T, H, Dv] float32, final state [B, H, Dk, Dv] float32).
    """
    if factors_in_scan is None:
        factors_in_scan = jax.default_backend() == "cpu"
    t = q.shape[1]
    xs = tuple(to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [N, B, H, C, ...]
    seg = chunk_segments(reset, chunk_size)

    if factors_in_scan:
        def step(state, x):
            *inputs, seg_n = x
            return chunk_state_step(state, chunk_factors(*inputs, seg_n, scale))

        # Backward recomputes each chunk's factors from its inputs instead of storing them.
        step = jax.checkpoint(step, prevent_cse=False)
        final, o = jax.lax.scan(step, initial_state, (*xs, seg))
    else:
        factors = chunk_factors(*xs, seg, scale)
        final, o = jax.lax.scan(chunk_state_step, initial_state, factors)
    return from_chunks(o, t), final
