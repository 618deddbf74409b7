"""HybridLM: embeddings, the decoder stack, final norm and LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ATTENTION, ModelConfig
from hybrid_jax.model import widening
from hybrid_jax.model.cache import DecodeCache, check_cache
from hybrid_jax.model.linear import linear
from hybrid_jax.model.norms import RMSNorm
from hybrid_jax.model.stack import DecoderStack
from hybrid_jax.ops.attention import segment_positions
from hybrid_jax.ops.moe import RouterStats
from hybrid_jax.ops.projection import projection_dot
from hybrid_jax.ops.rope import rope_cos_sin
from hybrid_jax.sharding import RESIDUAL, constrain, splits


class HybridLM(nnx.Module):
    """OLMo Hybrid causal language model.

    Parameters live in ``config.params_dtype`` and the forward pass runs in
    ``config.compute_dtype`` (GDN states, gates, norms and softmax stay float32 inside).
    Top-level parameters: ``embed.embedding`` [V, D], ``stack.blocks...`` [n, ...] (see
    ``hybrid_jax.model.stack``), ``final_norm.weight`` [D], ``lm_head.kernel`` [D, V] (absent when
    ``tie_word_embeddings``: the head then multiplies by ``embed.embedding``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        init = nnx.initializers.normal(config.initializer_range)
        pad = config.pad_token_id

        def embedding_init(key, shape, dtype):
            table = init(key, shape, dtype)
            # torch's nn.Embedding(padding_idx=pad) starts the pad row at zero.
            if pad is not None and 0 <= pad < shape[0]:
                table = table.at[pad].set(0)
            return table

        self.embed = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=config.compute_dtype,
            param_dtype=config.params_dtype, embedding_init=embedding_init, rngs=rngs)
        self.stack = DecoderStack(config, rngs=rngs)
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                  param_dtype=config.params_dtype,
                                  zero_centered=config.zero_centered_norms)
        self.lm_head = (None if config.tie_word_embeddings
                        else linear(config.hidden_size, config.vocab_size, config, rngs=rngs))

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: [B, T] int token ids.
          segment_ids: optional [B, T] ints for packed sequences: each document has its own id
            and occupies a contiguous run; no token sees another document (attention, convs and
            the GDN state all reset).
          positions: optional [B, T] (or [T]) RoPE positions. Default: 0..T-1, or the position inside
            each segment when ``segment_ids`` is given. Ignored under NoPE.
        Returns:
          logits [B, T, V] float32: the head runs in the compute dtype, as transformers' does,
          and its output is upcast for the loss.
        """
        return self.logits(self.features(input_ids, segment_ids=segment_ids,
                                         positions=positions))

    def logits(self, features: jax.Array) -> jax.Array:
        """The LM head on ``features`` [B, T, D] -> [B, T, V] float32."""
        return constrain(self._head(features), ("batch", "length", "vocab"))

    def features(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """What the LM head multiplies: the final norm's output [B, T, D] (arguments as for
        ``__call__``). With ``head_kernel``, ``ops.lm_head_loss`` takes the training loss from
        it without [B, T, V] logits."""
        return self.features_and_router_stats(input_ids, segment_ids, positions)[0]

    def features_and_router_stats(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterStats | None]:
        """``features`` and the MoE layers' router statistics summed over the stack (None
        without MoE layers), from which ``ops.moe.load_balancing_loss`` gives the auxiliary
        loss."""
        cfg = self.config
        rope = None
        if self._uses_rope:
            if positions is None:
                if segment_ids is not None:
                    positions = segment_positions(segment_ids)
                else:
                    positions = jnp.arange(input_ids.shape[1])
            positions = jnp.broadcast_to(positions, input_ids.shape)
            rope = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)
        x, stats = self.stack.with_router_stats(constrain(self._embed(input_ids), RESIDUAL),
                                                rope=rope, segment_ids=segment_ids)
        return self.final_norm(x), stats

    @property
    def head_kernel(self) -> jax.Array:
        """The LM head as [D, V] in the params dtype: ``lm_head.kernel``, or the embedding
        table transposed when the embeddings are tied."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    @property
    def _uses_rope(self) -> bool:
        return self.config.rope_theta is not None and ATTENTION in self.config.layer_types

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] rows of the embedding table, in the compute dtype. The
        lookup is tied to the ids (``widening``): in a decode loop, XLA:CPU would otherwise
        hold a float32 copy of a 16-bit table for the whole loop. Where positions are split
        (context parallelism), the table's model-width columns are gathered first, as FSDP
        gathers any weight: GSPMD would otherwise look up all of its rows' tokens, whole
        sequences, in each device's columns (one activation's worth per device without a
        context split, the context degree's times more with one)."""
        table = self.embed.embedding[...]
        if splits("length", input_ids.shape[1]):
            table = constrain(table, ("vocab", None))
        if widening.has_16bit_floats(table):
            table = widening.on_cpu(table, input_ids, cpu=widening.after, other=lambda t, _: t)
        return jnp.take(table, input_ids, axis=0).astype(self.config.compute_dtype)

    def _head(self, x: jax.Array) -> jax.Array:
        """LM head: [B, T, D] normed -> [B, T, V] float32."""
        if self.lm_head is not None:
            return self.lm_head(x).astype(jnp.float32)
        # Tied: x [B*T, D] against the table's rows [V, D], accumulated in float32.
        compute = self.config.compute_dtype
        flat = x.reshape(-1, x.shape[-1]).astype(compute)
        logits = projection_dot(flat, self.embed.embedding[...].astype(compute), ((1,), (1,)))
        return logits.reshape(*x.shape[:-1], -1).astype(jnp.float32)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, D] -> [B, T, V] float32."""
        return self._head(self.final_norm(x))

    def extend(
        self,
        input_ids: jax.Array,
        cache: DecodeCache,
        attention_mask: jax.Array | None = None,
        *,
        last_only: bool = False,
        block_params: tuple[nnx.State, ...] | None = None,
    ) -> tuple[jax.Array, DecodeCache]:
        """Run new tokens through the model, continuing from ``cache`` (prefill and decode).

        Prefilling a prompt at once or in pieces, then decoding one token at a time, gives the
        logits of a full forward over the same tokens. Each row continues from its own length.

        Args:
          input_ids: [B, T] int token ids (T = 1 for a decode step).
          cache: from ``init_cache`` or an earlier ``extend``; rows must have room for their
            new tokens (``lengths + valid tokens <= cache.max_length``; ``generate`` checks this,
            here tokens past the end would be dropped).
          attention_mask: optional [B, T], 0 for left padding: padding is neither written to the
            cache nor counted in a row's length, and real tokens take positions after the
            row's length. Padding may only come before a row's first real token in this call,
            and may follow earlier tokens in the cache (continuing a padded batch is exact).
          last_only: return only the last position's logits, [B, 1, V] (all a prefill needs).
          block_params: optional ``self.stack.block_params()``, sliced once before a decode
            loop so that no step copies the stacked weights again.
        Returns:
          (logits [B, T, V] or [B, 1, V] float32, the updated cache). Logits at padding
          positions are meaningless.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"extend: input_ids must be [B, T], got shape {input_ids.shape}")
        check_cache(cfg, cache, input_ids.shape[0])
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"extend: attention_mask shape {attention_mask.shape} does not match "
                             f"input_ids shape {input_ids.shape}")
        # A token's slot (= its position) counts the real tokens before it in its row.
        if attention_mask is None:
            valid = None  # no padding: the layers skip their masking
            n_new = jnp.full(input_ids.shape[:1], input_ids.shape[1], jnp.int32)
            slots = cache.lengths[:, None] + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        else:
            valid = attention_mask.astype(bool)
            n_new = jnp.sum(valid, axis=1, dtype=jnp.int32)
            slots = cache.lengths[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        rope = None
        if self._uses_rope:
            rope = rope_cos_sin(jnp.maximum(slots, 0), cfg.rotary_dim, cfg.rope_theta)
        x, layers = self.stack.extend(self._embed(input_ids), cache.layers, valid=valid,
                                      slots=slots, rope=rope, block_params=block_params)
        if last_only:
            x = x[:, -1:]
        lengths = cache.lengths + n_new
        return self._logits(x), DecodeCache(lengths=lengths, layers=layers)
