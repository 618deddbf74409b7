"""The gated delta rule as a step-by-step recurrence: the readable reference and the decode step.

All inputs here are already prepared by ``gated_delta_rule``: q and k have one head per value
head, q is not yet scaled, g and beta are float32, ``reset`` marks segment starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.chunk_factors import HIGHEST


def gdn_step(
    state: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """One token of the gated delta rule.

    Args:
      state: [B, H, Dk, Dv] float32, the state before this token.
      q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H] float32.
    Returns:
      (o [B, H, Dv] float32, new state [B, H, Dk, Dv] float32).
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    state = state * jnp.exp(g)[..., None, None]
    predicted = jnp.einsum("bhkv,bhk->bhv", state, k, precision=HIGHEST)
    delta = beta[..., None] * (v - predicted)
    state = state + k[..., :, None] * delta[..., None, :]
    o = jnp.einsum("bhkv,bhk->bhv", state, q * scale, precision=HIGHEST)
    return o, state


def gdn_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array,
    reset: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` over time.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H] float32;
      initial_state: [B, H, Dk, Dv] float32; reset: [B, T] bool (state zeroed before token t) or None.
    Returns:
      (o [B, T, H, Dv] float32, final state [B, H, Dk, Dv] float32).
    """

    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs
        if r_t is not None:
            state = jnp.where(r_t[:, None, None, None], 0.0, state)
        o_t, state = gdn_step(state, q_t, k_t, v_t, g_t, b_t, scale)
        return state, o_t

    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    xs = tuple(time_major(x) for x in (q, k, v, g, beta, reset))
    final, o = jax.lax.scan(step, initial_state, xs)
    return jnp.moveaxis(o, 0, 1), final
