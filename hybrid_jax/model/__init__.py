"""Flax NNX modules of OLMo Hybrid, thin over ``hybrid_jax.ops``."""

from hybrid_jax.model.functional import apply, split
from hybrid_jax.model.hybrid_lm import HybridLM

__all__ = ["HybridLM", "apply", "split"]
