"""Between the model's arrays and the kernels' layouts (``plan.Layout``).

Per-token arrays go token-major (GPU: [B, N * C, H, D], only zero-padded to whole chunks and
padded head dims) or as [B * H, N, C, D] sequences (TPU); per-position gates always as
[B * H, N, C] sequences; states as [B * H, Dk, Dv], zero-padded. Padding is inert: zero g,
beta and k leave the state alone, and padded key dims never enter it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.chunk_factors import chunk_segments
from hybrid_jax.gdn.pallas.plan import KernelPlan


class KernelInputs(NamedTuple):
    """The factor kernels' inputs. q, k: per-token, [B, N * C, Hk, Dk'] token-major (GPU: Hk
    key heads, each read by its group of value heads) or [R, N, C, Dk'] sequences (TPU, Hk
    repeated to H); v: per-token with Dv'; g, beta: [R, N, C] float32; seg: [R, N, C] int32,
    the segment index inside each chunk (0 without resets). R = B * H; Dk', Dv' padded."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array
    seg: jax.Array


def sequences(x: jax.Array, chunk_size: int, pad_to: int | None = None) -> jax.Array:
    """[B, T, H, ...] -> [B * H, N, C, ...]: T zero-padded to whole chunks and, given
    ``pad_to``, the last axis zero-padded to that size."""
    b, t, h = x.shape[:3]
    widths = [(0, 0), (0, -t % chunk_size)] + [(0, 0)] * (x.ndim - 2)
    if pad_to is not None:
        widths[-1] = (0, pad_to - x.shape[-1])
    x = jnp.pad(x, widths)
    x = x.reshape(b, -1, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1).reshape(b * h, -1, chunk_size, *x.shape[4:])


def from_sequences(x: jax.Array, b: int, t: int, h: int, d: int | None = None) -> jax.Array:
    """The inverse of ``sequences``: [B * H, N, C, ...] -> [B, T, H, ...], padding dropped."""
    x = x.reshape(b, h, -1, *x.shape[3:])[:, :, :t]
    if d is not None:
        x = x[..., :d]
    return jnp.moveaxis(x, 1, 2)


def per_token(x: jax.Array, pad_to: int, plan: KernelPlan) -> jax.Array:
    """A per-token [B, T, H, D] array (q, k, v, dO) as the kernels take it, D zero-padded to
    ``pad_to``: token-major (no copy when nothing needs padding) or sequences."""
    c = plan.chunk_size
    if not plan.layout.token_major:
        return sequences(x, c, pad_to)
    widths = ((0, 0), (0, -x.shape[1] % c), (0, 0), (0, pad_to - x.shape[-1]))
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def from_per_token(x: jax.Array, b: int, t: int, d: int, plan: KernelPlan) -> jax.Array:
    """The inverse of ``per_token``: [B, T, H, d], padding dropped."""
    if not plan.layout.token_major:
        return from_sequences(x, b, t, plan.layout.heads, d)
    return x[:, :t, :, :d]


def segment_sequences(reset: jax.Array | None, b: int, t: int, plan: KernelPlan) -> jax.Array:
    """[B, T] reset flags -> [R, N, C] int32 segment index inside each chunk, per sequence."""
    h, c = plan.layout.heads, plan.chunk_size
    n = -(-t // c)
    seg = chunk_segments(reset, c)  # [N, B, 1, C] or None
    if seg is None:
        return jnp.zeros((b * h, n, c), jnp.int32)
    seg = jnp.broadcast_to(jnp.moveaxis(seg, 0, 2), (b, h, n, c))
    return seg.reshape(b * h, n, c)


def kernel_inputs(q, k, v, g, beta, reset, plan: KernelPlan) -> KernelInputs:
    """The model's q, k [B, T, Hk, Dk], v [B, T, H, Dv], g, beta [B, T, H] and reset [B, T]
    (or None) in the plan's layout."""
    b, t, h = v.shape[:3]
    if not plan.layout.token_major and q.shape[2] != h:
        q, k = (jnp.repeat(x, h // q.shape[2], axis=2) for x in (q, k))
    c = plan.chunk_size
    return KernelInputs(
        q=per_token(q, plan.key_dim, plan), k=per_token(k, plan.key_dim, plan),
        v=per_token(v, plan.value_dim, plan), g=sequences(g, c), beta=sequences(beta, c),
        seg=segment_sequences(reset, b, t, plan))


def pad_state(x: jax.Array, plan: KernelPlan) -> jax.Array:
    """[B, H, Dk, Dv] -> [B * H, Dk', Dv'] float32, zero-padded."""
    b, h, dk, dv = x.shape
    widths = ((0, 0), (0, plan.key_dim - dk), (0, plan.value_dim - dv))
    return jnp.pad(x.astype(jnp.float32).reshape(b * h, dk, dv), widths)


def unpad_state(x: jax.Array, like: jax.Array) -> jax.Array:
    """The inverse of ``pad_state``, shaped and typed like ``like`` [B, H, Dk, Dv]."""
    b, h, dk, dv = like.shape
    return x[:, :dk, :dv].reshape(b, h, dk, dv).astype(like.dtype)
