"""The inference cache: what each layer keeps between prefill pieces and decode steps.

An attention layer keeps keys and values preallocated to a maximum length; a Gated DeltaNet
layer keeps a fixed-size state whatever the context: the last K-1 inputs of its q, k and v
convolutions and the recurrent state [B, Hv, Dk, Dv] in float32. That fixed size is where a
hybrid model's long-context memory and decode-speed advantage comes from.

Rows of a batch may sit at different lengths. Row b's tokens occupy attention slots
0 .. lengths[b]-1 (left padding is never written), and a token's slot is its position.

Every cache is a pytree of arrays (``jax.tree_util.register_dataclass``), so it goes through
``jax.jit``, ``lax.while_loop`` and ``jax.device_put`` with a sharding like any other state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.config import ATTENTION, GDN, ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values: ``k``, ``v`` [B, Hkv, S, Dh] in the compute dtype
    (keys after q/k-norm and RoPE).

    Head-major, so that the attention dots' batch dimensions (B, Hkv) lead: with [B, S, Hkv, Dh]
    XLA transposes the whole cache into that layout at every decode step.
    """

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GDNCache:
    """One Gated DeltaNet layer's state.

    conv_q, conv_k: [B, K-1, Hk*Dk]; conv_v: [B, K-1, Hv*Dv]: the last K-1 inputs of each short
    convolution (projections before the conv), in the compute dtype.
    state: [B, Hv, Dk, Dv] float32, the recurrent state after the last token.
    """

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    state: jax.Array


LayerCache = KVCache | GDNCache


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeCache:
    """Every layer's cache plus each row's length.

    lengths: [B] int32, tokens already in the cache per row (the next token's position).
    layers: one ``KVCache`` or ``GDNCache`` per decoder layer, in layer order.
    """

    lengths: jax.Array
    layers: tuple[LayerCache, ...]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        """Attention slots per row (0 when the model has no attention layer: no limit)."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return int(layer.k.shape[2])
        return 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's arrays."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self))

    def replace(self, **changes) -> DecodeCache:
        return dataclasses.replace(self, **changes)


def _layer_cache(config: ModelConfig, kind: str, batch: int, max_length: int, dtype) -> LayerCache:
    if kind == ATTENTION:
        shape = (batch, config.num_key_value_heads, max_length, config.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    if kind == GDN:
        width = config.linear_conv_kernel_dim - 1
        return GDNCache(
            conv_q=jnp.zeros((batch, width, config.linear_key_dim), dtype),
            conv_k=jnp.zeros((batch, width, config.linear_key_dim), dtype),
            conv_v=jnp.zeros((batch, width, config.linear_value_dim), dtype),
            state=jnp.zeros((batch, config.linear_num_value_heads, config.linear_key_head_dim,
                             config.linear_value_head_dim), jnp.float32),
        )
    raise ValueError(f"unknown layer kind {kind!r}")


def check_cache(config: ModelConfig, cache: DecodeCache, batch_size: int) -> None:
    """Raise ValueError naming the first layer (or field) where ``cache`` does not fit a model
    with ``config`` and a batch of ``batch_size`` rows. Checks shapes only, never values."""
    if cache.lengths.shape != (batch_size,):
        raise ValueError(f"cache: lengths has shape {cache.lengths.shape}, expected "
                         f"({batch_size},) for {batch_size} rows")
    if len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"cache: {len(cache.layers)} layers, the model has "
                         f"{config.num_hidden_layers}")
    # What init_cache would build, at the cache's own attention length.
    want = jax.eval_shape(lambda: init_cache(config, batch_size, cache.max_length or 1))
    for i, (kind, layer, ref) in enumerate(zip(config.layer_types, cache.layers, want.layers)):
        if type(layer) is not type(ref):
            raise ValueError(f"cache: layer {i} holds a {type(layer).__name__}, the model's layer "
                             f"{i} is {kind} (needs a {type(ref).__name__})")
        for name in ref.__dataclass_fields__:
            got, expected = getattr(layer, name).shape, getattr(ref, name).shape
            if got != expected:
                raise ValueError(f"cache: layer {i} {name} has shape {tuple(got)}, expected "
                                 f"{tuple(expected)}")


def init_cache(config: ModelConfig, batch_size: int, max_length: int) -> DecodeCache:
    """An empty cache (zeros, lengths 0) for ``batch_size`` rows of up to ``max_length`` tokens.

    Use under ``jax.eval_shape`` to size a cache without allocating it, or under ``jax.jit`` with
    ``out_shardings=cache_shardings(...)`` to allocate it straight into shards.
    """
    if batch_size <= 0:
        raise ValueError(f"init_cache: batch_size must be positive, got {batch_size}")
    if max_length <= 0:
        raise ValueError(f"init_cache: max_length must be positive, got {max_length}")
    dtype = config.compute_dtype
    layers = tuple(_layer_cache(config, kind, batch_size, max_length, dtype)
                   for kind in config.layer_types)
    return DecodeCache(lengths=jnp.zeros((batch_size,), jnp.int32), layers=layers)


def cache_partition_specs(cache: DecodeCache, *, batch_axis: str | tuple[str, ...] | None = "data",
                          head_axis: str | None = "tensor") -> DecodeCache:
    """PartitionSpecs for a cache: rows over ``batch_axis``, heads over ``head_axis`` (as the
    model's attention and GDN heads are), everything else replicated. Convolution windows are
    split over their channel axis, which is head-major, so each shard holds its heads' channels.
    Pass None for an axis to replicate along it."""
    b, h = batch_axis, head_axis

    def layer_specs(layer: LayerCache) -> LayerCache:
        if isinstance(layer, KVCache):
            return KVCache(k=PartitionSpec(b, h, None, None), v=PartitionSpec(b, h, None, None))
        conv = PartitionSpec(b, None, h)
        return GDNCache(conv_q=conv, conv_k=conv, conv_v=conv,
                        state=PartitionSpec(b, h, None, None))

    return DecodeCache(lengths=PartitionSpec(b), layers=tuple(map(layer_specs, cache.layers)))


def cache_shardings(cache: DecodeCache, mesh: Mesh, *, batch_axis: str | tuple[str, ...] | None = "data",
                    head_axis: str | None = "tensor") -> DecodeCache:
    """``NamedSharding``s on ``mesh`` for ``cache_partition_specs``; mesh axes that the mesh does
    not have are dropped (replicated), so one call serves data-only and tensor-only meshes."""
    names = set(mesh.axis_names)

    def keep(axis):
        if axis is None:
            return None
        if isinstance(axis, tuple):
            kept = tuple(a for a in axis if a in names)
            return kept or None
        return axis if axis in names else None

    specs = cache_partition_specs(cache, batch_axis=keep(batch_axis), head_axis=keep(head_axis))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
