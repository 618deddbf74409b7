"""RMS normalisations, computed in float32 as transformers' OLMo Hybrid does."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize_f32(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(variance + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *,
             zero_centered: bool = False) -> jax.Array:
    """RMSNorm over the last axis.

    Args:
      x: [..., D] in any float dtype.
      weight: [D].
      eps: added to the mean square.
      zero_centered: scale by ``1 + weight`` (Qwen3.5 / Qwen3-Next, whose weights start at 0).
    Returns:
      [..., D] in x's dtype. The scale happens on the float32 normalised value (weight promotes
      to float32) before the cast back, as in transformers.
    """
    if zero_centered:
        weight = 1.0 + weight.astype(jnp.float32)
    return (weight * _normalize_f32(x, eps)).astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Per-head RMSNorm followed by a SiLU gate: ``weight * norm(x) * silu(gate)``.

    Args:
      x: [..., Dv], normalised over the last axis (one head).
      gate: [..., Dv], same shape as x.
      weight: [Dv].
      eps: 1e-5 in OLMo Hybrid (FLA's fused gated norm default, not the model's rms_norm_eps).
    Returns:
      [..., Dv] in x's dtype. Casts follow transformers: the normalised value is cast back to x's
      dtype before the weight, and the gate is applied in float32.
    """
    normed = weight * _normalize_f32(x, eps).astype(x.dtype)
    return (normed * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
