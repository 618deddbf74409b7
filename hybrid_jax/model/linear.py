"""The bias-free projection every layer uses, initialised as transformers does."""

from __future__ import annotations

from flax import nnx

from hybrid_jax.config import ModelConfig


def linear(in_features: int, out_features: int, config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` with kernel [in, out] ~ normal(0, initializer_range), stored in the params
    dtype and applied in the compute dtype (torch's Linear weight is the transpose, [out, in])."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )
