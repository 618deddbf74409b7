"""Checkpoint conversion: transformers (safetensors) -> ``HybridLM``."""

from hybrid_jax.convert.from_hf import CheckpointError, from_hf

__all__ = ["CheckpointError", "from_hf"]
