"""The gated delta rule with the sequence split over a mesh axis (context parallelism).

Each device holds one contiguous piece of every row, [B, T / P, ...]. The state entering a
piece is an affine function of the state entering the one before: per value column the rule
is S <- A_t S + beta_t k_t v_t, so a whole piece maps S_in to M S_in + X, with M [Dk, Dk] the
product of its tokens' A_t (zero past a document boundary) and X [Dk, Dv] the state the piece
reaches from zero. Three steps, inside ``jax.shard_map`` over ``axis_name``:

1. fold: each device finds its piece's (M, X) by running the rule on its piece twice: from
   the state I with zero values (the state evolves as M), and from zero with its values
   (the state reaches X); any form, the Pallas kernels included; everything float32;
2. combine: the (M, X) of all pieces are all-gathered (P [Dk, Dk] and [Dk, Dv] matrices per
   head: small beside the activations) and each device applies those before its own to the
   initial state, in order;
3. rerun: each device runs the rule on its piece from its incoming state.

A piece that starts a new document (its first segment id differs from the previous piece's
last, read with ``ppermute``) starts from zero, and its M is zero. Gradients come from autodiff
through the three steps (the all-gather's transpose is a reduce-scatter); each device's memory
stays its own piece's. The cost is the rule three times over each piece, once with Dk value
columns and twice with Dv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.rule import Method, gated_delta_rule, l2_normalize


def _starts_a_document(segment_ids: jax.Array | None, axis_name: str) -> jax.Array:
    """[B] bool: whether this device's piece starts a new document (never on the first
    device, where ``initial_state`` applies)."""
    if segment_ids is None:
        return jnp.zeros((1,), bool)
    p = jax.lax.axis_size(axis_name)
    previous_last = jax.lax.ppermute(segment_ids[:, -1], axis_name,
                                     [(i, i + 1) for i in range(p - 1)])
    first_device = jax.lax.axis_index(axis_name) == 0
    return (segment_ids[:, 0] != previous_last) & ~first_device


def _piece_map(k, v, g, beta, segment_ids, method, chunk_size) -> tuple[jax.Array, jax.Array]:
    """(M [B, H, Dk, Dk], X [B, H, Dk, Dv]) float32 of this piece: the state after it is
    M S + X for the state S before it.

    Two runs of the rule, each checkpointed (its backward recomputes its own forward), rather
    than one with Dk + Dv value columns from [I | 0]: the kernels pad each head dim to their
    tile width (on TPU a power of two: 96 + 192 = 288 columns would become 512, against 128
    and 256 apart), and one narrower run at a time holds less."""
    b, t, h, dv = v.shape
    dk = k.shape[-1]
    q = jnp.zeros_like(k)  # the outputs of the fold are not used

    @functools.partial(jax.checkpoint, static_argnums=(1,))
    def final_state(values, with_identity):
        start = (jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (b, h, dk, dk))
                 if with_identity else None)
        return gated_delta_rule(q, k, values, g, beta, initial_state=start,
                                output_final_state=True, segment_ids=segment_ids,
                                method=method, chunk_size=chunk_size)[1]

    return final_state(jnp.zeros((b, t, h, dk), v.dtype), True), final_state(v, False)


def _incoming_states(m, x, initial_state, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """(the state entering this device's piece, the state after the last piece), from every
    piece's map (all-gathered) applied in order to ``initial_state``, all [B, H, Dk, Dv]."""
    ms = jax.lax.all_gather(m, axis_name)  # [P, B, H, Dk, Dk]
    xs = jax.lax.all_gather(x, axis_name)
    states = [initial_state]
    for j in range(ms.shape[0]):
        states.append(jnp.einsum("bhij,bhjv->bhiv", ms[j], states[-1],
                                 precision=jax.lax.Precision.HIGHEST) + xs[j])
    entering = jnp.stack(states[:-1])[jax.lax.axis_index(axis_name)]
    return entering, states[-1]


def gated_delta_rule_context_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    axis_name: str,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    use_qk_l2norm: bool = False,
    segment_ids: jax.Array | None = None,
    method: Method = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """``gated_delta_rule`` on this device's piece of a sequence split over ``axis_name``;
    call it inside ``jax.shard_map`` with the time axis sharded over ``axis_name``, pieces in
    device order.

    Args: as ``gated_delta_rule``, each per-token array this device's piece [B, T / P, ...];
      ``initial_state`` [B, Hv, Dk, Dv] (the whole row's, the same on every device);
      ``segment_ids`` this piece's [B, T / P] (a document may span pieces).
    Returns:
      (o [B, T / P, Hv, Dv] in q's dtype, the final state of the whole sequence
      [B, Hv, Dk, Dv] float32, the same on every device).
    """
    b, _, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if hv != hk:
        q, k = (jnp.repeat(x, hv // hk, axis=2) for x in (q, k))
    if initial_state is None:
        initial_state = jnp.zeros((b, hv, dk, dv), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)
    fresh = _starts_a_document(segment_ids, axis_name)[:, None, None, None]
    m, x = _piece_map(k, v, g, beta, segment_ids, method, chunk_size)
    m = jnp.where(fresh, 0.0, m)  # nothing before a document start reaches past it
    entering, final = _incoming_states(m, x, initial_state, axis_name)
    entering = jnp.where(fresh, 0.0, entering)
    o, _ = gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=entering,
                            segment_ids=segment_ids, method=method, chunk_size=chunk_size)
    return o, final
