"""The decoder stack: a repeating block of layers, scanned over depth.

OLMo Hybrid repeats a block of ``p = config.layer_period`` layers (3 GDN + 1 attention). The stack
holds ``n = num_hidden_layers / p`` copies of one ``DecoderBlock`` whose parameters are stacked
along a new leading axis, so every parameter under ``blocks`` has shape [n, ...]; HF layer
``j * p + i`` is position i of copy j. The layout is the same whether the stack is scanned or
unrolled, so checkpoints move freely between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.cache import LayerCache
from hybrid_jax.model.decoder import Rope, make_layer
from hybrid_jax.model import widening
from hybrid_jax.model.host_views import row_views
from hybrid_jax.ops import moe
from hybrid_jax.ops.moe import RouterStats
from hybrid_jax.sharding import RESIDUAL, constrain

Carry = tuple[jax.Array, RouterStats | None]  # the residual stream and the router statistics

_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # "layers": DecoderBlock checkpoints each layer instead (saving every layer's input)
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_after(state: nnx.State, j: jax.Array, after: jax.Array) -> nnx.State:
    """Block ``j``'s parameters, sliced out of the stacked [n, ...] ``state`` inside a loop over
    blocks once ``after`` (the block's input) is computed. With 16-bit weights on XLA:CPU this
    keeps one block's copy at a time and no float32 copy of any (``widening``)."""
    state = widening.after(state, after)
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False), state)


class DecoderBlock(nnx.Module):
    """``len(kinds)`` decoder layers, (mixer, mlp) kinds each, applied in order; with remat
    "layers", each one recomputed in the backward pass from its saved input."""

    def __init__(self, config: ModelConfig, kinds: tuple[tuple[str, str], ...], *,
                 rngs: nnx.Rngs) -> None:
        self.per_layer_remat = config.remat == "layers"
        self.layers = nnx.List([make_layer(mixer, mlp, config, rngs=rngs)
                                for mixer, mlp in kinds])

    def __call__(self, x: jax.Array, *, rope: Rope = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, RouterStats | None]:
        """[B, T, D] -> ([B, T, D], the MoE layers' router statistics summed, or None)."""
        stats = None
        for layer in self.layers:
            if self.per_layer_remat:
                graphdef, state = nnx.split(layer)

                def run(h, s, graphdef=graphdef):
                    return nnx.merge(graphdef, s)(h, rope=rope, segment_ids=segment_ids)

                x, layer_stats = jax.checkpoint(run)(x, state)
            else:
                x, layer_stats = layer(x, rope=rope, segment_ids=segment_ids)
            stats = add_stats(stats, layer_stats)
        return x, stats


def add_stats(a: RouterStats | None, b: RouterStats | None) -> RouterStats | None:
    """The sum of two layers' (or blocks') router statistics, either of which may be None."""
    if a is None or b is None:
        return b if a is None else a
    return moe.add_stats(a, b)


class DecoderStack(nnx.Module):
    """All decoder layers: ``blocks`` is one ``DecoderBlock`` with parameters stacked [n, ...]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        period = config.layer_period
        self.num_blocks = config.num_hidden_layers // period
        kinds = tuple(zip(config.layer_types, config.mlp_kinds))[:period]

        def init_block_state(key: jax.Array) -> nnx.State:
            return nnx.state(DecoderBlock(config, kinds, rngs=nnx.Rngs(params=key)))

        # Build the n copies' parameters at once with vmap (each from its own key), then attach
        # them to one block's structure.
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderBlock(config, kinds, rngs=nnx.Rngs(0))))
        keys = jax.random.split(rngs.params(), self.num_blocks)
        self.blocks = nnx.merge(graphdef, jax.vmap(init_block_state)(keys))

    @property
    def scanned(self) -> bool:
        """Whether the forward pass scans over blocks (else a Python loop unrolls them)."""
        return self.config.scan_layers and self.num_blocks > 1

    def __call__(self, x: jax.Array, *, rope: Rope = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D] -> [B, T, D] (``with_router_stats`` without the statistics)."""
        return self.with_router_stats(x, rope=rope, segment_ids=segment_ids)[0]

    def with_router_stats(self, x: jax.Array, *, rope: Rope = None,
                          segment_ids: jax.Array | None = None
                          ) -> tuple[jax.Array, RouterStats | None]:
        """x: [B, T, D] -> ([B, T, D], the MoE layers' router statistics summed over the stack,
        or None when no layer has one).

        Scanned over the stacked blocks, or unrolled, as ``scanned`` says; but with 16-bit
        weights in a program for XLA:CPU always a loop that slices block j once its input is
        ready (``block_after``): XLA:CPU would otherwise hold float32 copies of the stacked
        weights (scanned) or bf16 copies of every block at once (unrolled)."""
        graphdef, state = nnx.split(self.blocks)
        # The loops carry (h, stats): stats start at zero where the block has MoE layers.
        start = (moe.zero_stats(self.config.num_experts)
                 if self.config.has_moe else None)

        def block_fn(looped: bool) -> Callable[[Carry, nnx.State], Carry]:
            def run_block(carry: Carry, block_state: nnx.State) -> Carry:
                h, stats = carry
                h, block_stats = nnx.merge(graphdef, block_state)(h, rope=rope,
                                                                  segment_ids=segment_ids)
                return constrain(h, RESIDUAL), add_stats(stats, block_stats)

            remat = self.config.remat
            if remat in ("none", "layers"):  # "layers": DecoderBlock checkpoints each layer
                return run_block
            # Inside a loop, CSE across iterations cannot undo the remat: prevent_cse not needed.
            return jax.checkpoint(run_block, policy=_REMAT_POLICIES[remat],
                                  prevent_cse=not looped)

        def stacked(carry: Carry, state: nnx.State) -> Carry:
            run_block = block_fn(looped=self.scanned)
            if self.scanned:
                return jax.lax.scan(lambda c, s: (run_block(c, s), None), carry, state)[0]
            for j in range(self.num_blocks):
                carry = run_block(carry, jax.tree.map(lambda a, j=j: a[j], state))
            return carry

        def sliced_in_loop(carry: Carry, state: nnx.State) -> Carry:
            run_block = block_fn(looped=True)
            return jax.lax.fori_loop(
                0, self.num_blocks,
                lambda j, c: run_block(c, block_after(state, j, c[0])), carry)

        if widening.has_16bit_floats(state):
            return widening.on_cpu((x, start), state, cpu=sliced_in_loop, other=stacked)
        return stacked((x, start), state)

    def block_params(self) -> tuple[nnx.State, ...]:
        """Each block's parameters, sliced out of the stacked [n, ...] arrays (a copy).

        A decode loop slices these once, before the loop, and passes them to every ``extend``:
        slicing inside the loop body copies every weight matrix at every step (XLA:CPU does not
        hoist the slices out of a while loop), which for a small batch doubles the bytes a
        step reads. The price is a second copy of the stack's weights while decoding.
        """
        state = nnx.state(self.blocks)
        return tuple(jax.tree.map(lambda a, j=j: a[j], state) for j in range(self.num_blocks))

    def block_views(self) -> tuple[nnx.State, ...] | None:
        """Each block's parameters as arrays sharing the stacked arrays' memory (no copy), or
        None where the arrays cannot be viewed (``host_views.row_views``: only concrete arrays
        on one CPU device can). Made outside a program and passed to it as ``block_params``,
        they leave nothing for the program to slice."""
        state = nnx.state(self.blocks)
        leaves, treedef = jax.tree.flatten(state)
        rows = [row_views(a) for a in leaves]
        if not leaves or any(r is None for r in rows):
            return None
        return tuple(jax.tree.unflatten(treedef, [r[j] for r in rows])
                     for j in range(self.num_blocks))

    def extend(self, x: jax.Array, caches: tuple[LayerCache, ...], *, valid: jax.Array | None,
               slots: jax.Array, rope: Rope = None,
               block_params: tuple[nnx.State, ...] | None = None,
               ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Cached forward: x [B, T, D] -> [B, T, D] and each layer's updated cache.

        Unrolled over layers even when ``__call__`` scans: every layer's cache is its own
        buffer, updated in place inside a decode loop. Scanning would pass each key/value cache
        through the scan's stacked outputs, a full copy of the cache per token.
        ``block_params``: optional per-block parameters, ``self.block_params()`` computed once
        outside a decode loop or ``self.block_views()``; default: sliced here.
        """
        graphdef = nnx.graphdef(self.blocks)
        if block_params is None:
            block_params = self.block_params()
        period = len(self.blocks.layers)
        new_caches = []
        for j, params in enumerate(block_params):
            block = nnx.merge(graphdef, params)
            for i, layer in enumerate(block.layers):
                x, cache = layer.extend(x, caches[j * period + i], valid=valid, slots=slots,
                                        rope=rope)
                new_caches.append(cache)
        return x, tuple(new_caches)
