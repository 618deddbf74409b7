"""The experts' MLP with the experts split over a mesh axis (expert parallelism), inside
``shard_map``.

Device p of the axis (size P) holds experts [p E/P, (p + 1) E/P) and its own tokens. The
tokens of the axis's devices are exchanged: each device gathers all of them with their
routing, runs the assignments that fall on its experts (the others are dropped from its
grouped products: ``expert_mlp`` skips expert ids past its last group) and the partial
outputs are summed back to each token's device by a reduce-scatter. Dropless: every
assignment is computed once, on its expert's device; nothing is capped.

Per device and layer this moves P times its tokens' activations in (all-gather) and out
(reduce-scatter), where a ragged all-to-all would move each assignment once (k/E of that
per expert); the gather form needs no per-step size exchange and keeps every shape static.
The partial outputs are summed in x's dtype (in bf16 runs, each token's contributions from
at most k devices are rounded to bf16 before they are added, where one device adds its k in
float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops.moe import Routing, expert_mlp


def local_routing(routing: Routing, first: jax.Array, count: int) -> Routing:
    """``routing`` restricted to experts [first, first + count), renumbered from 0: an
    assignment elsewhere gets expert id ``count`` (past the last local group, so that the
    grouped products skip it) and weight 0."""
    local = routing.experts - first
    inside = (local >= 0) & (local < count)
    return Routing(weights=jnp.where(inside, routing.weights, 0.0),
                   experts=jnp.where(inside, local, count).astype(jnp.int32),
                   probs=routing.probs)


def expert_parallel_mlp(x: jax.Array, routing: Routing, gate_up: jax.Array, down: jax.Array,
                        *, axis_name: str | tuple[str, ...], method: str = "auto") -> jax.Array:
    """Inside ``shard_map`` over ``axis_name``: this device's tokens through their experts.

    Args:
      x: [N, D] this device's tokens.
      routing: their routing (weights, experts [N, k], global expert ids; probs unused).
      gate_up: [E / P, D, 2I] this device's experts (device p: experts p E/P onwards).
      down: [E / P, I, D].
      axis_name: the mesh axis the experts are split over.
      method: ``expert_mlp``'s.
    Returns:
      [N, D] in x's dtype: the sum over each token's k experts, wherever they are.
    """
    count = gate_up.shape[0]
    first = jax.lax.axis_index(axis_name) * count
    gather = lambda a: jax.lax.all_gather(a, axis_name, axis=0, tiled=True)
    everyone = Routing(weights=gather(routing.weights), experts=gather(routing.experts),
                       probs=routing.probs)
    partial = expert_mlp(gather(x), local_routing(everyone, first, count), gate_up, down,
                         method=method)
    return jax.lax.psum_scatter(partial, axis_name, scatter_dimension=0, tiled=True)
