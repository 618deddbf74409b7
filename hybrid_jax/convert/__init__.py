"""Checkpoint conversion between transformers (safetensors) and ``HybridLM``."""

from hybrid_jax.convert.checkpoint import checkpoint_format, load_checkpoint
from hybrid_jax.convert.from_hf import CheckpointError, from_hf
from hybrid_jax.convert.to_hf import to_hf

__all__ = ["CheckpointError", "checkpoint_format", "from_hf", "load_checkpoint", "to_hf"]
