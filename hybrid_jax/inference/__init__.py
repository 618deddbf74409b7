"""Inference: cached prefill and decode, sampling, generation."""

from hybrid_jax.inference.errors import InputError, InputTypeError
from hybrid_jax.inference.generate import decode, generate, prefill
from hybrid_jax.inference.sampling import SamplingConfig, filter_logits, sample_tokens
from hybrid_jax.model.cache import (
    DecodeCache,
    GDNCache,
    KVCache,
    cache_partition_specs,
    cache_shardings,
    init_cache,
)

__all__ = [
    "DecodeCache",
    "GDNCache",
    "InputError",
    "InputTypeError",
    "KVCache",
    "SamplingConfig",
    "cache_partition_specs",
    "cache_shardings",
    "decode",
    "filter_logits",
    "generate",
    "init_cache",
    "prefill",
    "sample_tokens",
]
