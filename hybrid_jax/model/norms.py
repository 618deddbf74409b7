"""RMSNorm modules (thin wrappers over ``hybrid_jax.ops.norms``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.ops.norms import gated_rms_norm, rms_norm


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale ``weight`` [D]: initialised to ones, or,
    ``zero_centered``, to zeros and applied as ``1 + weight``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32,
                 zero_centered: bool = False) -> None:
        self.eps = eps
        self.zero_centered = zero_centered
        init = jnp.zeros if zero_centered else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] in x's dtype."""
        return rms_norm(x, self.weight[...], self.eps, zero_centered=self.zero_centered)


class GatedRMSNorm(nnx.Module):
    """Per-head RMSNorm times ``silu(gate)``; ``weight`` [Dv] is shared by all heads."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32) -> None:
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        """x, gate: [..., H, Dv] -> [..., H, Dv] in x's dtype."""
        return gated_rms_norm(x, gate, self.weight[...], self.eps)
