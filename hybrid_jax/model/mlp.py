"""The MLPs after each token mixer: SwiGLU, and a mixture of SwiGLU experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.linear import linear
from hybrid_jax.ops.moe import (
    Routing,
    RouterStats,
    dense_expert_mlp,
    expert_mlp,
    route_top_k,
    router_stats,
)
from hybrid_jax.ops.moe_parallel import expert_parallel_mlp
from hybrid_jax.sharding import constrain, per_shard, split_axes


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

    def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
        """x [B, T, D] -> (y [B, T, D] in the compute dtype, this layer's router statistics for
        the load-balancing loss)."""
        cfg = self.config
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        routing = route_top_k(self.router(flat), cfg.num_experts_per_tok,
                              normalize=cfg.norm_topk_prob)
        compute = cfg.compute_dtype
        gate_up = self.experts_gate_up[...].astype(compute)
        down = self.experts_down[...].astype(compute)
        axis = split_axes("experts", cfg.num_experts)
        if cfg.moe_method == "dense":
            y = dense_expert_mlp(flat, routing, gate_up, down)
        elif axis is not None:
            y = self._expert_parallel(x, routing, gate_up, down, axis).reshape(b * t, d)
        else:
            y = expert_mlp(flat, routing, gate_up, down, method=cfg.moe_method)
        if self.shared_expert is not None:
            shared = self.shared_expert(x).reshape(b * t, d)
            y = y + jax.nn.sigmoid(self.shared_expert_gate(flat)) * shared
        return y.astype(compute).reshape(b, t, d), router_stats(routing)

    def _expert_parallel(self, x: jax.Array, routing: Routing, gate_up: jax.Array,
                         down: jax.Array, axis: str | tuple[str, ...]) -> jax.Array:
        """The experts split over mesh ``axis`` (``ops.moe_parallel``): each device runs its
        rows' tokens, exchanged across the axis, through its own experts (their weights
        gathered over their fsdp split first). x [B, T, D] -> [B, T, D]."""
        cfg = self.config
        b, t, d = x.shape
        k = cfg.num_experts_per_tok
        experts = ("experts", None, None)
        gate_up, down = constrain(gate_up, experts), constrain(down, experts)

        def run(x, weights, ids, gate_up, down):
            rows = x.shape[0] * x.shape[1]
            local = Routing(weights=weights.reshape(rows, k), experts=ids.reshape(rows, k),
                            probs=None)
            y = expert_parallel_mlp(x.reshape(rows, d), local, gate_up, down, axis_name=axis,
                                    method=cfg.moe_method)
            return y.reshape(x.shape)

        tokens = ("batch", "length", None)
        return per_shard(run, [tokens] * 3 + [experts] * 2, tokens, x.shape)(
            x, routing.weights.reshape(b, t, k), routing.experts.reshape(b, t, k), gate_up, down)


def zero_stats(num_experts: int) -> RouterStats:
    """Router statistics of no tokens (the sum's start)."""
    zeros = jnp.zeros((num_experts,), jnp.float32)
    return RouterStats(counts=zeros, prob_sums=zeros, tokens=jnp.zeros((), jnp.float32))
