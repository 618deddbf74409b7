"""Causal depthwise short convolution module (one per q, k and v in Gated DeltaNet)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.ops.conv import (causal_conv1d, causal_conv1d_context_parallel,
                                 causal_conv1d_continue)
from hybrid_jax.sharding import per_shard, shard_count, split_axes


class ShortConvolution(nnx.Module):
    """Causal depthwise conv of width K over [B, T, C], no bias, optional SiLU.

    ``weight`` is [C, K] (torch's Conv1d weight [C, 1, K] without the group axis). It is
    initialised like torch's ``nn.Conv1d`` default, uniform(+-1/sqrt(K)) (fan-in K for a depthwise
    conv), which is what OLMo-core / FLA train from; transformers' ``_init_weights`` would draw
    normal(0, initializer_range) instead, which makes the conv nearly zero at init.

    ``channel_axis``: the logical name of the channel dimension (how a mesh splits it), used where
    positions are split over a mesh axis (context parallelism): each device then convolves its
    own piece with the K-1 inputs before it passed from the previous device.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        activation: str | None = "silu",
        channel_axis: str | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.activation = activation
        self.channel_axis = channel_axis
        self.dtype = dtype
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (channels, kernel_size), param_dtype, -bound, bound)
        )

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, C] -> [B, T, C] in the compute dtype; no position sees an earlier segment."""
        weight = self.weight[...].astype(self.dtype)
        x = x.astype(self.dtype)
        t, k = x.shape[1], weight.shape[1]
        context = split_axes("length", t)
        # Pieces shorter than the K-1 inputs a position reads back: GSPMD's partitioning.
        if context is None or t // shard_count("length", t) < k - 1:
            return causal_conv1d(x, weight, segment_ids=segment_ids, activation=self.activation)

        def conv(x, weight, *ids):
            return causal_conv1d_context_parallel(x, weight, axis_name=context,
                                                  segment_ids=ids[0] if ids else None,
                                                  activation=self.activation)

        rows = ("batch", "length", self.channel_axis)
        names = [rows, (self.channel_axis, None)] + ([] if segment_ids is None
                                                 else [("batch", "length")])
        ids = () if segment_ids is None else (segment_ids,)
        return per_shard(conv, names, rows, out_shape=x.shape)(x, weight, *ids)

    def extend(self, x: jax.Array, window: jax.Array,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Continue a sequence whose last K-1 inputs were ``window`` [B, K-1, C].

        x: [B, T, C]; valid: optional [B, T], False on left padding (skipped).
        Returns (y [B, T, C] in the compute dtype, the new window)."""
        weight = self.weight[...].astype(self.dtype)
        return causal_conv1d_continue(x.astype(self.dtype), window, weight,
                                      activation=self.activation, valid=valid)
