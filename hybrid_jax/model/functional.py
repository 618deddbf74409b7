"""Pure-functional form of ``HybridLM`` for notebooks and custom training loops.

    graphdef, params = split(model)
    logits = apply(graphdef, params, input_ids)        # composes with jax.jit/grad/vmap
"""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.model.hybrid_lm import HybridLM


def split(model: HybridLM) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static structure and an ``nnx.State`` pytree of all parameters."""
    return nnx.split(model)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] float32 of ``HybridLM`` rebuilt from ``split``'s output; pure in params."""
    model = nnx.merge(graphdef, params)
    return model(input_ids, segment_ids=segment_ids, positions=positions)
