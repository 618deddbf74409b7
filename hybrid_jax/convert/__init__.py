"""Checkpoint conversion between transformers (safetensors) and ``HybridLM``."""

from hybrid_jax.convert.from_hf import CheckpointError, from_hf
from hybrid_jax.convert.to_hf import to_hf

__all__ = ["CheckpointError", "from_hf", "to_hf"]
