"""hybrid_jax: hybrid Gated DeltaNet / attention language models in JAX/Flax: OLMo Hybrid,
Qwen3.5 (dense and MoE) and Qwen3-Next.

Checkpoint conversion lives in ``hybrid_jax.convert`` (imported on demand).
"""

from hybrid_jax.config import (
    ModelConfig,
    olmo_hybrid_7b,
    olmo_hybrid_bytes,
    olmo_hybrid_small,
    olmo_hybrid_tiny,
)
from hybrid_jax.inference import generate, init_cache
from hybrid_jax.model import HybridLM, apply, split
from hybrid_jax.presets import PRESETS

__all__ = [
    "HybridLM",
    "ModelConfig",
    "PRESETS",
    "apply",
    "generate",
    "init_cache",
    "olmo_hybrid_7b",
    "olmo_hybrid_bytes",
    "olmo_hybrid_small",
    "olmo_hybrid_tiny",
    "split",
]
