"""Full softmax attention: OLMo Hybrid's (q/k norms over the projections' width) and Qwen's
(per-head q/k norms, partial RoPE, a sigmoid output gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.cache import KVCache
from hybrid_jax.model.linear import linear
from hybrid_jax.model.norms import RMSNorm
from hybrid_jax.ops.attention import (cached_attention, causal_attention,
                                      resolve_attention)
from hybrid_jax.ops.ring_attention import ring_attention
from hybrid_jax.ops.rope import apply_rope
from hybrid_jax.sharding import constrain, per_shard, split_axes, split_together


class Attention(nnx.Module):
    """Causal GQA attention with q/k RMSNorms before RoPE (none under NoPE).

    ``config.qk_norm`` "projection" (OLMo): the norms span the whole projection width (H * Dh
    and Hkv * Dh), applied before splitting heads: ``q_norm.weight`` [H*Dh],
    ``k_norm.weight`` [Hkv*Dh]. "head" (Qwen): one norm per head, shared by all heads:
    ``q_head_norm.weight``, ``k_head_norm.weight`` [Dh].
    ``config.attention_output_gate`` (Qwen): ``q_proj`` is twice as wide, each head's Dh
    query columns followed by its Dh gate columns ([D, H*2*Dh], transformers' layout); the
    attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
    Other parameters: ``{q,k,v,o}_proj.kernel`` [in, out].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        q_dim = config.num_attention_heads * hd
        kv_dim = config.num_key_value_heads * hd
        gated = 2 if config.attention_output_gate else 1
        self.q_proj = linear(d, gated * q_dim, config, rngs=rngs)
        self.k_proj = linear(d, kv_dim, config, rngs=rngs)
        self.v_proj = linear(d, kv_dim, config, rngs=rngs)
        self.o_proj = linear(q_dim, d, config, rngs=rngs)
        norm = lambda n: RMSNorm(n, eps=config.rms_norm_eps, param_dtype=config.params_dtype,
                                 zero_centered=config.zero_centered_norms)
        if config.qk_norm == "head":
            self.q_head_norm, self.k_head_norm = norm(hd), norm(hd)
        else:
            self.q_norm, self.k_norm = norm(q_dim), norm(kv_dim)

    def _qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None):
        """q [B, T, H, Dh], k and v [B, T, Hkv, Dh]: projected, normed, rotated; and the output
        gate [B, T, H, Dh] (None without ``attention_output_gate``)."""
        cfg = self.config
        b, t, _ = x.shape
        hd, h, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x).reshape(b, t, hkv, hd)
        gate = None
        if cfg.attention_output_gate:
            q, gate = jnp.split(q.reshape(b, t, h, 2 * hd), 2, axis=-1)
        if cfg.qk_norm == "head":
            q = self.q_head_norm(q.reshape(b, t, h, hd))
            k = self.k_head_norm(k.reshape(b, t, hkv, hd))
        else:
            q = self.q_norm(q).reshape(b, t, h, hd)
            k = self.k_norm(k).reshape(b, t, hkv, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (constrain(q, ("batch", "length", "heads", None)),
                constrain(k, ("batch", "length", "kv_heads", None)),
                constrain(v, ("batch", "length", "kv_heads", None)), gate)

    def _out(self, o: jax.Array, gate: jax.Array | None) -> jax.Array:
        """o [B, T, H, Dh] (times ``sigmoid(gate)``, in the compute dtype) -> o_proj [B, T, D]."""
        if gate is not None:
            o = o.astype(gate.dtype) * jax.nn.sigmoid(gate)
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, -1))

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
        q, k, v, gate = self._qkv(x, rope)
        return self._out(self._attend(q, k, v, segment_ids), gate)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
                segment_ids: jax.Array | None) -> jax.Array:
        """Causal attention of q [B, T, H, Dh] over k, v [B, T, Hkv, Dh] -> [B, T, H, Dh].

        Where positions are split (``sharding.activation_sharding``'s "length", the context
        axis), each device keeps its piece and keys and values go round a ring
        (``ops.ring_attention``, zig-zag balanced), in blocks of ``attention_block_size``.
        Otherwise ``attention_method``'s form: XLA's forms partitioned by GSPMD, the splash
        kernel (which XLA cannot partition) run per device on its rows and heads."""
        cfg = self.config
        scale = cfg.head_dim ** -0.5
        t = q.shape[1]
        context = split_axes("length", t)
        method = resolve_attention(cfg.attention_method, t, cfg.attention_block_size,
                                   head_dim=cfg.head_dim, dtype=q.dtype,
                                   packed=segment_ids is not None)
        kernel = method in ("splash", "splash_stand_in")  # Pallas: run per device
        if context is None and not kernel:
            return causal_attention(q, k, v, segment_ids=segment_ids, scale=scale,
                                    implementation=method, block_size=cfg.attention_block_size)

        def attend(q, k, v, *seg):
            seg = seg[0] if seg else None
            if context is None:
                return causal_attention(q, k, v, segment_ids=seg, scale=scale,
                                        implementation=method)
            return ring_attention(q, k, v, axis_name=context, segment_ids=seg, scale=scale,
                                  block_size=cfg.attention_block_size,
                                  cost_analysis=method == "blockwise_unrolled")

        # Query and key heads split together or not at all, keeping each group whole.
        heads = split_together(("heads", cfg.num_attention_heads),
                               ("kv_heads", cfg.num_key_value_heads))
        length = "length" if context is not None else None
        names = [("batch", length, heads[0], None)] + [("batch", length, heads[1], None)] * 2
        args = [q, k, v]
        if segment_ids is not None:
            args.append(segment_ids)
            names.append(("batch", length))
        return per_shard(attend, names, names[0], q.shape)(*args)

    def extend(
        self,
        x: jax.Array,
        cache: KVCache,
        *,
        valid: jax.Array | None,
        slots: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Continue from ``cache``: write the new keys and values, attend over the cache.

        x: [B, T, D]; valid: [B, T] bool, False for left padding, which is not written (None:
        no padding);
        slots: [B, T] int32, each token's cache slot (= its position); rope as ``__call__``,
        at those positions. Returns (y [B, T, D], the updated cache).
        """
        b = x.shape[0]
        q, k, v, gate = self._qkv(x, rope)
        # Padding writes to slot S, past the end, which the scatter drops.
        write = slots if valid is None else jnp.where(valid, slots, cache.k.shape[2])
        rows = jnp.arange(b)[:, None]
        # Cache [B, Hkv, S, Dh]: the two index arrays around the head slice put the update's
        # axes in the order [B, T, Hkv, Dh], k's own.
        cache = KVCache(k=cache.k.at[rows, :, write].set(k.astype(cache.k.dtype), mode="drop"),
                        v=cache.v.at[rows, :, write].set(v.astype(cache.v.dtype), mode="drop"))
        o = cached_attention(q, cache.k, cache.v, slots, scale=self.config.head_dim ** -0.5)
        return self._out(o.astype(x.dtype), gate), cache
