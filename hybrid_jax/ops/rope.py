"""Rotary position embeddings (the "default" RoPE, rotate-half convention of transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for i < head_dim / 2, float32 [head_dim // 2]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for the given positions.

    Args:
      positions: [B, T] integer positions.
      head_dim: rotary dimension (the full head dim).
      theta: RoPE base.
    Returns:
      (cos, sin), each [B, T, head_dim] float32; the two halves of the last axis repeat the same
      frequencies. Kept in float32 whatever the compute dtype, as OLMo Hybrid does.
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x by the position angles.

    Args:
      x: [B, T, H, D].
      cos, sin: [B, T, R] float32 (from ``rope_cos_sin``), R <= D: the first R dims of each
        head rotate and the rest pass through (partial rotary embedding, as transformers'
        Qwen3.5 / Qwen3-Next).
    Returns:
      [B, T, H, D] in x's dtype (the rotation itself is computed in float32 through promotion).
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    rotated = (rot * cos + _rotate_half(rot) * sin).astype(x.dtype)
    return rotated if r == x.shape[-1] else jnp.concatenate([rotated, rest], axis=-1)
