"""SwiGLU feed-forward block."""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.linear import linear
from hybrid_jax.sharding import constrain


class SwiGLU(nnx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(d, f, config, rngs=rngs)
        self.up_proj = linear(d, f, config, rngs=rngs)
        self.down_proj = linear(f, d, config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D] in the compute dtype."""
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "mlp")))
