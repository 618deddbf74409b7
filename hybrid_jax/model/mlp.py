"""The MLPs after each token mixer: SwiGLU, and a mixture of SwiGLU experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.linear import linear
from hybrid_jax.ops.moe import (
    RouterStats,
    dense_expert_mlp,
    expert_mlp,
    route_top_k,
    router_stats,
)
from hybrid_jax.ops.moe_parallel import expert_parallel_mlp
from hybrid_jax.ops.projection import projection_dot
from hybrid_jax.sharding import constrain, per_shard, shard_count, split_axes


class SwiGLU(nnx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases; width
    ``intermediate_size`` (default: the config's)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
                 intermediate_size: int | None = None) -> None:
        d, f = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = linear(d, f, config, rngs=rngs)
        self.up_proj = linear(d, f, config, rngs=rngs)
        self.down_proj = linear(f, d, config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D] in the compute dtype."""
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "mlp")))


class MoE(nnx.Module):
    """Qwen's sparse MoE block: a softmax top-k router over ``num_experts`` SwiGLU experts
    (dropless: ``ops.moe.expert_mlp`` sorts the tokens by expert for grouped matmuls), plus a
    shared expert scaled by ``sigmoid(shared_expert_gate(x))`` when
    ``shared_expert_intermediate_size`` > 0.

    Parameters: ``router.kernel`` [D, E] (transformers' ``mlp.gate.weight`` transposed),
    ``experts_gate_up`` [E, D, 2I] (each expert's gate columns, then its up columns),
    ``experts_down`` [E, I, D], ``shared_expert.{gate,up,down}_proj.kernel``,
    ``shared_expert_gate.kernel`` [D, 1].
    Where a mesh's ``expert`` axis splits the experts (``sharding``), each device runs its
    own experts on the tokens of that axis's devices (``ops.moe_parallel``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        d, e, f = config.hidden_size, config.num_experts, config.moe_intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.router = linear(d, e, config, rngs=rngs)
        self.experts_gate_up = nnx.Param(init(rngs.params(), (e, d, 2 * f), config.params_dtype))
        self.experts_down = nnx.Param(init(rngs.params(), (e, f, d), config.params_dtype))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = (SwiGLU(config, rngs=rngs, intermediate_size=shared)
                              if shared else None)
        self.shared_expert_gate = linear(d, 1, config, rngs=rngs) if shared else None

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, RouterStats]:
        """x [B, T, D] -> (y [B, T, D] in the compute dtype, this layer's router statistics for
        the load-balancing loss, counting the tokens where ``token_mask`` [B, T] is true:
        all by default).

        Under a mesh each device routes its own rows' tokens (``sharding.per_shard``): the
        router's and the experts' weights are gathered whole (their split over ``expert``
        kept, where the mesh has one: ``ops.moe_parallel`` then exchanges the tokens)."""
        cfg = self.config
        b, t, d = x.shape
        compute = cfg.compute_dtype
        axis = split_axes("experts", cfg.num_experts)
        experts = ("experts", None, None)
        router = constrain(self.router.kernel[...].astype(compute), (None, None))
        gate_up = constrain(self.experts_gate_up[...].astype(compute), experts)
        down = constrain(self.experts_down[...].astype(compute), experts)
        mask = jnp.ones((b, t), bool) if token_mask is None else token_mask

        def run(x, mask, router, gate_up, down):
            rows = x.shape[0] * x.shape[1]
            flat = x.reshape(rows, d)
            routing = route_top_k(projection_dot(flat, router), cfg.num_experts_per_tok,
                                  normalize=cfg.norm_topk_prob)
            if cfg.moe_method == "dense":
                y = dense_expert_mlp(flat, routing, gate_up, down)
            elif axis is not None:
                y = expert_parallel_mlp(flat, routing, gate_up, down, axis_name=axis,
                                        method=cfg.moe_method)
            else:
                y = expert_mlp(flat, routing, gate_up, down, method=cfg.moe_method)
            stats = router_stats(routing, mask.reshape(rows))
            # Per device: a [1, 1, ...] piece of the [row shards, position shards, ...] stats.
            return (y.reshape(x.shape),
                    *(jnp.reshape(s, (1, 1) + s.shape) for s in stats))

        pieces = shard_count("batch", b), shard_count("length", t)
        e = cfg.num_experts
        tokens, per_piece = ("batch", "length", None), ("batch", "length")
        out = per_shard(run, [tokens, per_piece, (None, None), experts, experts],
                        (tokens, tokens, tokens, per_piece),
                        (x.shape, pieces + (e,), pieces + (e,), pieces))(
            x, mask, router, gate_up, down)
        y, stats = out[0], RouterStats(*(jnp.sum(s, axis=(0, 1)) for s in out[1:]))
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(x))
            y = y + gate * self.shared_expert(x)
        return y.astype(compute), stats
