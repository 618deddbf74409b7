"""Full softmax attention of OLMo Hybrid's attention layers (OLMo 2/3 style q/k norms)."""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.linear import linear
from hybrid_jax.model.norms import RMSNorm
from hybrid_jax.ops.attention import causal_attention
from hybrid_jax.ops.rope import apply_rope


class Attention(nnx.Module):
    """Causal GQA attention. q_norm and k_norm are RMSNorms over the whole projection width
    (H * Dh and Hkv * Dh), applied before splitting heads; RoPE follows unless NoPE.

    Parameters: ``{q,k,v,o}_proj.kernel`` [in, out], ``q_norm.weight`` [H*Dh], ``k_norm.weight``
    [Hkv*Dh].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        q_dim = config.num_attention_heads * hd
        kv_dim = config.num_key_value_heads * hd
        self.q_proj = linear(d, q_dim, config, rngs=rngs)
        self.k_proj = linear(d, kv_dim, config, rngs=rngs)
        self.v_proj = linear(d, kv_dim, config, rngs=rngs)
        self.o_proj = linear(q_dim, d, config, rngs=rngs)
        self.q_norm = RMSNorm(q_dim, eps=config.rms_norm_eps, param_dtype=config.params_dtype)
        self.k_norm = RMSNorm(kv_dim, eps=config.rms_norm_eps, param_dtype=config.params_dtype)

    def __call__(
        self,
        x: jax.Array,
        *,
        rope: tuple[jax.Array, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, T, D] -> [B, T, D].

        rope: (cos, sin) [B, T, Dh] float32, or None for NoPE.
        segment_ids: [B, T]; tokens attend only within their segment.
        """
        cfg = self.config
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = self.q_norm(self.q_proj(x)).reshape(b, t, cfg.num_attention_heads, hd)
        k = self.k_norm(self.k_proj(x)).reshape(b, t, cfg.num_key_value_heads, hd)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = causal_attention(q, k, v, segment_ids=segment_ids, scale=hd ** -0.5)
        return self.o_proj(o.reshape(b, t, -1))
