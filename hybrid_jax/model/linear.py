"""The bias-free projection every layer uses, initialised as transformers does."""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.ops.projection import projection_dot_general
from hybrid_jax.sharding import splits


class Dense(nnx.Linear):
    """``nnx.Linear`` applied to [..., in] inputs as one [rows, in] @ [in, out] product.

    Same parameters and values; the reshape is for XLA:CPU, whose gradients of a matmul over
    [B, T, in] activations (the kernel's cotangent contracts two batch dimensions) are far
    slower than the same products on [B*T, in]. Not where
    positions are split over a mesh axis (context parallelism): GSPMD cannot merge a row split
    with a position split, and would gather whole sequences to flatten them. The product itself
    is ``ops.projection.projection_matmul`` (``linear`` passes it as ``dot_general``)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        lead = inputs.shape[:-1]
        if inputs.ndim == 3 and splits("length", inputs.shape[1]):
            return super().__call__(inputs)
        out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return out.reshape(*lead, out.shape[-1])


def linear(in_features: int, out_features: int, config: ModelConfig, *, rngs: nnx.Rngs) -> Dense:
    """``Dense`` with kernel [in, out] ~ normal(0, initializer_range), stored in the params
    dtype and applied in the compute dtype (torch's Linear weight is the transpose, [out, in])."""
    return Dense(
        in_features,
        out_features,
        use_bias=False,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        dot_general=projection_dot_general,
        rngs=rngs,
    )
