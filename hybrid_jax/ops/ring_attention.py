"""Causal attention with the sequence split over a mesh axis (context parallelism): a ring.

Each of the P devices of ``axis_name`` holds one contiguous piece of every row, [B, T / P, ...],
device i positions [i T / P, (i + 1) T / P). Keys and values go round the ring (``ppermute``,
one pass per step, P steps in an XLA loop); each device attends its queries to every piece as
it passes and merges the results by their log-sum-exp, so a device never holds more than two
pieces of keys and values. The VJP goes round again, the keys' and values' cotangents
travelling with them and arriving home after P passes.

Why a ring and not an all-gather of keys and values: the gather holds the whole sequence's K
and V on every device, 2 T Hkv D elements per row (and their float32 cotangents in the VJP),
the ring two pieces, 4 T Hkv D / P; both move the same bytes (each piece visits every
device), the ring in steps that overlap the attention of the piece in hand.

Causal masking leaves device i's queries only i + 1 of the P pieces to see, so with contiguous
pieces the last device would do P times the first one's work. With ``load_balance`` (zig-zag),
each device's piece is cut in two halves, exchanged so that device i holds halves i and
2P - 1 - i of the 2P: every device then has the same number of visible key blocks, and the
outputs return to the contiguous layout at the end. Blocks wholly in a query's future are
skipped, not masked (``blockwise_attention.attend_blocks``' dynamic loop bounds).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops.blockwise_attention import (DEFAULT_BLOCK, Offsets, attend_blocks,
                                                attend_blocks_vjp, check_attention_shapes)


class Pieces(NamedTuple):
    """The local part of the sequence as ``parts`` pieces of equal length, head-major, and
    where each starts in the whole sequence: one array per piece (separate arrays, not one
    stacked array, so that updating one piece never copies the others)."""

    q: tuple[jax.Array, ...]  # [B, J, G, L, D] each
    k: tuple[jax.Array, ...]  # [B, J, L, D] each
    v: tuple[jax.Array, ...]  # [B, J, L, D] each
    segment_ids: tuple[jax.Array, ...] | None  # [B, L] int32 each


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str | tuple[str, ...],
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK,
    load_balance: bool = True,
    cost_analysis: bool = False,
) -> jax.Array:
    """Softmax attention where token t sees tokens s <= t of its own segment, over a sequence
    split along ``axis_name``. Call inside ``jax.shard_map``; every device of the axis holds
    the same rows.

    Args:
      q: [B, T_local, H, D], this device's contiguous piece of the queries.
      k, v: [B, T_local, Hkv, D] with Hkv dividing H (query head j*G+g uses kv head j).
      segment_ids: optional [B, T_local] integers; tokens attend only to equal ids (a document
        may span any number of devices).
      scale: defaults to D**-0.5.
      block_size: query and key block length, lowered to divide the pieces.
      load_balance: zig-zag the pieces (needs an even T_local); else contiguous.
      cost_analysis: trace a loop-free program for XLA's cost analysis (which counts a loop's
        body once): the block loops unrolled at the first device's offsets on every device.
        Zig-zag gives every device the same key blocks, so the cost is each device's; the
        values are not the attention's.
    Returns:
      [B, T_local, H, D] in q's dtype, this device's piece of the output.
    """
    check_attention_shapes("ring_attention", q, k, v, segment_ids)
    b, t, h, d = q.shape
    scale = float(d ** -0.5 if scale is None else scale)
    parts = 2 if load_balance and t % 2 == 0 else 1
    length = t // parts
    block = math.gcd(block_size, length)
    hkv = k.shape[2]
    split = functools.partial(_split, parts=parts, axis_name=axis_name)
    qh = jnp.transpose(q.reshape(b, t, hkv, h // hkv, d), (0, 2, 3, 1, 4))  # [B, J, G, T, D]
    pieces = Pieces(q=split(qh, axis=3), k=split(jnp.swapaxes(k, 1, 2), axis=2),
                    v=split(jnp.swapaxes(v, 1, 2), axis=2),
                    segment_ids=None if segment_ids is None else split(
                        segment_ids.astype(jnp.int32), axis=1))
    if cost_analysis and parts != 2:
        raise ValueError("ring_attention: cost_analysis needs load_balance and an even T_local")
    o = _ring(pieces, axis_name, scale, block, cost_analysis)  # parts x [B, J, G, L, D]
    o = _merge(o, parts=parts, axis_name=axis_name, axis=3)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)


def _zigzag_perms(p: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """ppermute pairs sending each device's first and second halves (global halves 2i and
    2i + 1) to their zig-zag owners: half c belongs to device c if c < P, else 2P - 1 - c."""
    owner = lambda c: c if c < p else 2 * p - 1 - c
    return [(i, owner(2 * i)) for i in range(p)], [(i, owner(2 * i + 1)) for i in range(p)]


def _split(x: jax.Array, *, parts: int, axis_name, axis: int) -> tuple[jax.Array, ...]:
    """x's local positions (``axis``) as ``parts`` pieces: the contiguous piece (one part),
    or this device's zig-zag halves i and 2P - 1 - i (two parts)."""
    if parts == 1:
        return (x,)
    first, second = jnp.split(x, 2, axis=axis)
    to_even, to_odd = _zigzag_perms(jax.lax.axis_size(axis_name))
    from_even = jax.lax.ppermute(first, axis_name, to_even)  # global half 2i's new owner
    from_odd = jax.lax.ppermute(second, axis_name, to_odd)
    # Device i's lower half (global index i) came from the even halves if i is even.
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.where(even, from_even, from_odd), jnp.where(even, from_odd, from_even)


def _merge(x: tuple[jax.Array, ...], *, parts: int, axis_name, axis: int) -> jax.Array:
    """``_split``'s inverse: the pieces back to the contiguous piece along ``axis``."""
    if parts == 1:
        return x[0]
    to_even, to_odd = _zigzag_perms(jax.lax.axis_size(axis_name))
    invert = lambda pairs: [(dst, src) for src, dst in pairs]
    even = jax.lax.axis_index(axis_name) % 2 == 0
    even_half = jnp.where(even, x[0], x[1])  # the half with an even global index
    odd_half = jnp.where(even, x[1], x[0])
    first = jax.lax.ppermute(even_half, axis_name, invert(to_even))
    second = jax.lax.ppermute(odd_half, axis_name, invert(to_odd))
    return jnp.concatenate([first, second], axis=axis)


def _starts(device, parts: int, length: int, p: int) -> list:
    """First positions of a device's ``parts`` pieces of ``length`` in the whole sequence."""
    if parts == 1:
        return [device * length]
    return [device * length, (2 * p - 1 - device) * length]


def _send_on(tree, axis_name):
    """Pass every array of ``tree`` one device along the ring (i -> i + 1 mod P)."""
    p = jax.lax.axis_size(axis_name)
    perm = [(i, (i + 1) % p) for i in range(p)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _ring(pieces: Pieces, axis_name, scale: float, block: int, unroll: bool
          ) -> tuple[jax.Array, ...]:
    """[B, J, G, L, D] float32 per local query piece, attended over the whole ring."""
    return _ring_forward(pieces, axis_name, scale, block, unroll)[0]


def _device(axis_name, unroll: bool):
    """This device's index on the ring: 0 when unrolled for cost analysis (static offsets)."""
    return 0 if unroll else jax.lax.axis_index(axis_name)


def _steps(p: int, step, carry, unroll: bool):
    """``carry = step(i, carry)`` for the ring's P steps: an XLA loop, so that one step's
    buffers are live at a time (unrolled, the scheduler overlaps steps and holds several
    pieces' temporaries at once), or a Python loop for cost analysis."""
    if unroll:
        for i in range(p):
            carry = step(i, carry)
        return carry
    return jax.lax.fori_loop(0, p, step, carry)


def _ring_forward(pieces: Pieces, axis_name, scale, block, unroll):
    parts, length = len(pieces.q), pieces.q[0].shape[3]
    p = jax.lax.axis_size(axis_name)
    me = _device(axis_name, unroll)
    q_starts = _starts(me, parts, length, p)

    def step(i, carry):
        o, lse, visiting = list(carry[0]), list(carry[1]), carry[2]
        k_starts = _starts((me - i) % p, parts, length, p)
        k, v, seg_k = visiting
        for a in range(parts):
            for c in range(parts):
                o_ac, lse_ac = attend_blocks(
                    pieces.q[a], k[c], v[c], _at(pieces.segment_ids, a), _at(seg_k, c),
                    Offsets(q_starts[a], k_starts[c]), scale, block, block, unroll)
                new = jnp.logaddexp(lse[a], lse_ac)
                o[a] = (jnp.exp(lse[a] - new)[..., None] * o[a]
                        + jnp.exp(lse_ac - new)[..., None] * o_ac)
                lse[a] = new
        # Passed on after every step, the last one's pass wasted (1 / P more traffic) for one
        # loop body: the pieces are back home at the end.
        return tuple(o), tuple(lse), _send_on(visiting, axis_name)

    lowest = jnp.finfo(jnp.float32).min
    init = (tuple(jnp.zeros(q.shape, jnp.float32) for q in pieces.q),
            tuple(jnp.full(q.shape[:-1], lowest, jnp.float32) for q in pieces.q),
            (pieces.k, pieces.v, pieces.segment_ids))
    o, lse, _ = _steps(p, step, init, unroll)
    return o, (pieces, o, lse)


def _at(x, i):
    return None if x is None else x[i]


def _ring_backward(axis_name, scale, block, unroll, res, d_o):
    pieces, o, lse = res
    parts, length = len(pieces.q), pieces.q[0].shape[3]
    p = jax.lax.axis_size(axis_name)
    me = _device(axis_name, unroll)
    q_starts = _starts(me, parts, length, p)
    delta = [jnp.sum(o_a * do_a, axis=-1) for o_a, do_a in zip(o, d_o)]  # [B, J, G, L]
    d_o = [do_a.astype(pieces.q[0].dtype) for do_a in d_o]

    def step(i, carry):
        d_q, d_k, d_v = (list(x) for x in carry[:3])
        visiting = carry[3]
        k_starts = _starts((me - i) % p, parts, length, p)
        k, v, seg_k = visiting
        for a in range(parts):
            for c in range(parts):
                d_q[a], d_k[c], d_v[c] = attend_blocks_vjp(
                    pieces.q[a], k[c], v[c], _at(pieces.segment_ids, a), _at(seg_k, c),
                    Offsets(q_starts[a], k_starts[c]), lse[a], delta[a], d_o[a], scale,
                    block, block, unroll, into=(d_q[a], d_k[c], d_v[c]))
        # The cotangents follow their keys and values; after P passes they are home.
        d_k, d_v = _send_on((tuple(d_k), tuple(d_v)), axis_name)
        return tuple(d_q), d_k, d_v, _send_on(visiting, axis_name)

    zeros = lambda xs: tuple(jnp.zeros(x.shape, jnp.float32) for x in xs)
    init = (zeros(pieces.q), zeros(pieces.k), zeros(pieces.v),
            (pieces.k, pieces.v, pieces.segment_ids))
    d_q, d_k, d_v, _ = _steps(p, step, init, unroll)
    cast = lambda xs, like: tuple(x.astype(y.dtype) for x, y in zip(xs, like))
    d_seg = (None if pieces.segment_ids is None
             else tuple(np.zeros(s.shape, jax.dtypes.float0) for s in pieces.segment_ids))
    return (Pieces(q=cast(d_q, pieces.q), k=cast(d_k, pieces.k), v=cast(d_v, pieces.v),
                   segment_ids=d_seg),)


_ring.defvjp(_ring_forward, _ring_backward)
