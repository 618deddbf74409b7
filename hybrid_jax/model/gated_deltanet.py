"""Gated DeltaNet token mixer (the linear-attention layers of OLMo Hybrid)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.cache import GDNCache
from hybrid_jax.model.linear import linear
from hybrid_jax.model.norms import GatedRMSNorm
from hybrid_jax.model.short_conv import ShortConvolution
from hybrid_jax.gdn import gated_delta_rule, gated_delta_rule_context_parallel
from hybrid_jax.sharding import constrain, per_shard, split_axes, split_together


def _init_a_log(key: jax.Array, n: int, config: ModelConfig, dtype: jnp.dtype) -> jax.Array:
    """A_log = log(A), A ~ uniform(a_log_min, a_log_max): per-head decay rates. [Hv]"""
    a = jax.random.uniform(key, (n,), jnp.float32, config.linear_a_log_min, config.linear_a_log_max)
    return jnp.log(a).astype(dtype)


def _init_dt_bias(key: jax.Array, n: int, config: ModelConfig, dtype: jnp.dtype) -> jax.Array:
    """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] clamped below at the floor,
    so that softplus(a + dt_bias) starts near dt for a ~ 0. [Hv]"""
    lo, hi = math.log(config.linear_dt_min), math.log(config.linear_dt_max)
    dt = jnp.exp(jax.random.uniform(key, (n,), jnp.float32) * (hi - lo) + lo)
    dt = jnp.maximum(dt, config.linear_dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class GatedDeltaNet(nnx.Module):
    """q, k, v projections each through a causal short conv + SiLU, the gated delta rule with
    L2-normalised q and k, a per-head gated RMSNorm (gate = g_proj(x)), then o_proj.

    Qwen3.5 and Qwen3-Next fuse the input projections and the convs in their checkpoints
    (``convert`` splits them into these); ``g_proj`` is their ``z``.

    Parameters (torch names in transformers): ``{q,k,v,a,b,g,o}_proj.kernel`` [in, out],
    ``{q,k,v}_conv.weight`` [C, K], ``A_log`` [Hv], ``dt_bias`` [Hv], ``o_norm.weight`` [Dv].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        d = config.hidden_size
        hv = config.linear_num_value_heads
        key_dim, value_dim = config.linear_key_dim, config.linear_value_dim
        self.q_proj = linear(d, key_dim, config, rngs=rngs)
        self.k_proj = linear(d, key_dim, config, rngs=rngs)
        self.v_proj = linear(d, value_dim, config, rngs=rngs)
        self.a_proj = linear(d, hv, config, rngs=rngs)
        self.b_proj = linear(d, hv, config, rngs=rngs)
        self.g_proj = linear(d, value_dim, config, rngs=rngs)
        self.o_proj = linear(value_dim, d, config, rngs=rngs)
        conv = lambda c, heads: ShortConvolution(
            c, config.linear_conv_kernel_dim, activation="silu", channel_axis=heads,
            dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)
        self.q_conv = conv(key_dim, "gdn_key_heads")
        self.k_conv = conv(key_dim, "gdn_key_heads")
        self.v_conv = conv(value_dim, "gdn_heads")
        self.A_log = nnx.Param(_init_a_log(rngs.params(), hv, config, config.params_dtype))
        self.dt_bias = nnx.Param(_init_dt_bias(rngs.params(), hv, config, config.params_dtype))
        self.o_norm = GatedRMSNorm(config.linear_value_head_dim, eps=config.linear_norm_eps,
                                   param_dtype=config.params_dtype)

    def _gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(beta, g), each [B, T, Hv] float32, from x [B, T, D]."""
        beta = jax.nn.sigmoid(self.b_proj(x))
        if self.config.linear_allow_neg_eigval:
            beta = beta * 2.0  # eigenvalues of (I - beta k k^T) in [-1, 1]
        # Log-space decay per value head, in float32: g = -exp(A_log) * softplus(a + dt_bias) <= 0.
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        return beta.astype(jnp.float32), g

    def _heads(self, q: jax.Array, k: jax.Array, v: jax.Array):
        """[B, T, C] conv outputs -> q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv]."""
        cfg = self.config
        b, t = q.shape[:2]
        key_heads = ("batch", "length", "gdn_key_heads", None)
        return (constrain(q.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
                          key_heads),
                constrain(k.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
                          key_heads),
                constrain(v.reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim),
                          ("batch", "length", "gdn_heads", None)))

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        """Gated RMSNorm (gate = g_proj(x)) of the rule's output o [B, T, Hv, Dv], then o_proj."""
        b, t, hv, dv = o.shape
        gate = self.g_proj(x).reshape(b, t, hv, dv)
        return self.o_proj(self.o_norm(o, gate).reshape(b, t, hv * dv))

    def _rule(self, q, k, v, g, beta, method: str, *, segment_ids=None, initial_state=None
              ) -> tuple[jax.Array, jax.Array | None]:
        """The gated delta rule on [B, T, H, D] heads: (o [B, T, Hv, Dv], final state
        [B, Hv, Dk, Dv] given ``initial_state``, else None).

        Under a mesh (``sharding.activation_sharding``), each device runs the rule on its rows
        and heads (XLA cannot partition a Pallas kernel). Key and value heads split together
        or not at all, keeping value head h with key head h // G. Where positions are split
        ("length", the context axis), each device runs its piece of every sequence and the
        state passes between pieces (``gdn.context_parallel``); the final state is then the
        same on every device of that axis."""
        cfg = self.config
        with_state = initial_state is not None
        context = split_axes("length", q.shape[1])

        def rule(q, k, v, g, beta, *rest):
            kw = dict(use_qk_l2norm=True, segment_ids=rest[0] if segment_ids is not None else None,
                      initial_state=rest[-1] if with_state else None, method=method,
                      chunk_size=cfg.gdn_chunk_size)
            if context is not None:
                o, final = gated_delta_rule_context_parallel(q, k, v, g, beta,
                                                             axis_name=context, **kw)
            else:
                o, final = gated_delta_rule(q, k, v, g, beta, output_final_state=with_state,
                                            **kw)
            return (o, final) if with_state else o

        heads = split_together(("gdn_key_heads", cfg.linear_num_key_heads),
                               ("gdn_heads", cfg.linear_num_value_heads))
        length = "length" if context is not None else None
        kh, vh = (("batch", length, h, None) for h in heads)
        args, names = [q, k, v, g, beta], [kh, kh, vh, vh[:3], vh[:3]]
        if segment_ids is not None:
            args.append(segment_ids)
            names.append(("batch", length))
        if with_state:
            args.append(initial_state)
            names.append(("batch", heads[1], None, None))
        with jax.named_scope("gdn_rule"):
            if not with_state:
                return per_shard(rule, names, vh, out_shape=v.shape)(*args), None
            return per_shard(rule, names, (vh, names[-1]),
                             out_shape=(v.shape, initial_state.shape))(*args)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D] (compute dtype) -> [B, T, D]. ``segment_ids`` [B, T] resets the convs and
        the recurrent state at each new segment."""
        cfg = self.config
        q, k, v = self._heads(self.q_conv(self.q_proj(x), segment_ids=segment_ids),
                              self.k_conv(self.k_proj(x), segment_ids=segment_ids),
                              self.v_conv(self.v_proj(x), segment_ids=segment_ids))
        beta, g = self._gates(x)
        o, _ = self._rule(q, k, v, g, beta, cfg.gdn_method, segment_ids=segment_ids)
        return self._output(x, o)

    def extend(self, x: jax.Array, cache: GDNCache, *,
               valid: jax.Array | None = None) -> tuple[jax.Array, GDNCache]:
        """Continue from ``cache`` (conv windows and recurrent state).

        x: [B, T, D]; valid: optional [B, T] bool, False on left padding (None: no padding).
        Padding leaves the cache as it was, whatever the cache holds: the convolutions skip it
        (the window runs straight into the row's first real token) and its decay and write
        strength are zeroed, so the state passes through unchanged.
        One token (decode) runs the recurrent step, more (prefill) the chunked form.
        Returns (y [B, T, D], meaningless at padding; the updated cache).
        """
        cfg = self.config
        t = x.shape[1]
        q, conv_q = self.q_conv.extend(self.q_proj(x), cache.conv_q, valid)
        k, conv_k = self.k_conv.extend(self.k_proj(x), cache.conv_k, valid)
        v, conv_v = self.v_conv.extend(self.v_proj(x), cache.conv_v, valid)
        q, k, v = self._heads(q, k, v)
        beta, g = self._gates(x)
        if valid is not None:
            # S <- exp(0) S + k (0 * (v - S^T k)) = S.
            beta = jnp.where(valid[..., None], beta, 0.0)
            g = jnp.where(valid[..., None], g, 0.0)
        o, state = self._rule(q, k, v, g, beta, "recurrent" if t == 1 else cfg.gdn_method,
                              initial_state=cache.state)
        return self._output(x, o), GDNCache(conv_q=conv_q, conv_k=conv_k, conv_v=conv_v,
                                            state=state)
