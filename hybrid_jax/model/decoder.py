"""Decoder layers: pre-norm Gated DeltaNet layers and post-norm (OLMo 2) attention layers."""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.config import ATTENTION, GDN, ModelConfig
from hybrid_jax.model.attention import Attention
from hybrid_jax.model.cache import GDNCache, KVCache
from hybrid_jax.model.gated_deltanet import GatedDeltaNet
from hybrid_jax.model.mlp import SwiGLU
from hybrid_jax.model.norms import RMSNorm

Rope = tuple[jax.Array, jax.Array] | None


def _hidden_norm(config: ModelConfig) -> RMSNorm:
    """An RMSNorm over the residual stream [.., hidden_size]."""
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.params_dtype)


class GatedDeltaNetLayer(nnx.Module):
    """Pre-norm: ``h = x + gdn(pre_gdn_norm(x)); out = h + mlp(pre_mlp_norm(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.pre_gdn_norm = _hidden_norm(config)
        self.gdn = GatedDeltaNet(config, rngs=rngs)
        self.pre_mlp_norm = _hidden_norm(config)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, *, rope: Rope = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]; ``rope`` is unused (GDN has no positions)."""
        with jax.named_scope("gdn"):  # names in profiles (experiments/profile_train_step.py)
            mixed = self.gdn(self.pre_gdn_norm(x), segment_ids=segment_ids)
        return self._finish(x, mixed)

    def extend(self, x: jax.Array, cache: GDNCache, *, valid: jax.Array | None, slots: jax.Array,
               rope: Rope = None) -> tuple[jax.Array, GDNCache]:
        """Cached form of ``__call__`` (see ``GatedDeltaNet.extend``); ``slots``, ``rope`` unused."""
        mixed, cache = self.gdn.extend(self.pre_gdn_norm(x), cache, valid=valid)
        return self._finish(x, mixed), cache

    def _finish(self, x: jax.Array, mixed: jax.Array) -> jax.Array:
        h = x + mixed
        with jax.named_scope("mlp"):
            return h + self.mlp(self.pre_mlp_norm(h))


class AttentionLayer(nnx.Module):
    """Post-norm ("reordered norm", OLMo 2/3):
    ``h = x + post_attn_norm(attn(x)); out = h + post_mlp_norm(mlp(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = _hidden_norm(config)
        self.mlp = SwiGLU(config, rngs=rngs)
        self.post_mlp_norm = _hidden_norm(config)

    def __call__(self, x: jax.Array, *, rope: Rope = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]; ``rope`` is (cos, sin) or None for NoPE."""
        with jax.named_scope("attention"):
            mixed = self.attn(x, rope=rope, segment_ids=segment_ids)
        return self._finish(x, mixed)

    def extend(self, x: jax.Array, cache: KVCache, *, valid: jax.Array | None, slots: jax.Array,
               rope: Rope = None) -> tuple[jax.Array, KVCache]:
        """Cached form of ``__call__`` (see ``Attention.extend``)."""
        mixed, cache = self.attn.extend(x, cache, valid=valid, slots=slots, rope=rope)
        return self._finish(x, mixed), cache

    def _finish(self, x: jax.Array, mixed: jax.Array) -> jax.Array:
        h = x + self.post_attn_norm(mixed)
        with jax.named_scope("mlp"):
            return h + self.post_mlp_norm(self.mlp(h))


LAYER_CLASSES: dict[str, type[nnx.Module]] = {GDN: GatedDeltaNetLayer, ATTENTION: AttentionLayer}


def make_layer(kind: str, config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """A decoder layer of the given kind ("linear_attention" or "full_attention")."""
    return LAYER_CLASSES[kind](config, rngs=rngs)
