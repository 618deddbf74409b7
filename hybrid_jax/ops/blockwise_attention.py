"""Causal grouped-query attention in blocks (flash attention's algorithm, written in XLA):
memory linear in the sequence length.

``causal_attention``'s dense form holds a [H, T, T] float32 logit tensor per row, forward and
backward: 4 H T^2 bytes, quadratic in the sequence length. Here each
query block runs over the key blocks at or before it with an online softmax (a running max,
sum and weighted sum), so only [block_q, block_k] logits exist at a time, and the blocks
above the diagonal are skipped rather than masked. The VJP keeps only the output and each row's
log-sum-exp, and recomputes each block's probabilities: one pass over the key blocks
accumulates dK and dV per key block and adds dQ into its query block.

Numerics follow the dense form: logits, softmax, running statistics and every accumulator in
float32; the matmul operands in the inputs' dtype (probabilities and logit cotangents cast to
it, as flash attention does), so bf16 inputs run bf16 matmuls with float32 accumulation.
Masked logits become -inf before any exp, against a running max that starts finite, so no
exp ever sees inf - inf. The dense form (``attention._xla_attention``) is its twin in the
tests, with a float64 NumPy softmax under both.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Query and key block length: larger blocks re-read K and V fewer times.
DEFAULT_BLOCK = 1024


def blockwise_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    unroll: bool = False,
) -> jax.Array:
    """Softmax attention where token t sees tokens s <= t of its own segment, in blocks.

    Args:
      q [B, T, H, D], k and v [B, T, Hkv, D], segment_ids, scale: as
        ``attention.causal_attention``.
      block_q, block_k: rows of queries and keys per block (each clipped to T); T is padded up
        to a multiple of both, with the padded keys after every real query (never seen) and
        the padded queries' rows dropped.
      unroll: run the block loops in Python, leaving no XLA loop: for XLA's cost analysis,
        which counts a loop's body once (``hybrid_jax.aot``). The program grows with
        (T / block)^2.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    check_attention_shapes("blockwise_causal_attention", q, k, v, segment_ids)
    b, t, h, d = q.shape
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"blockwise_causal_attention: {name} must be a positive integer, "
                             f"got {value!r}")
    if scale is None:
        scale = d ** -0.5
    hkv = k.shape[2]
    g = h // hkv
    block_q, block_k = min(block_q, t), min(block_k, t)
    padded = -(-t // math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - t)])
    # Head-major: queries [B, Hkv, G, T, D] (query head j*G+g uses kv head j), keys and
    # values [B, Hkv, T, D]; a block is a slice along T.
    qh = jnp.transpose(q.reshape(b, padded, hkv, g, d), (0, 2, 3, 1, 4))
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    o = _attention(qh, kh, vh, segment_ids, float(scale), block_q, block_k, bool(unroll))
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, padded, h, d)[:, :t]


def check_attention_shapes(caller: str, q: jax.Array, k: jax.Array, v: jax.Array,
                           segment_ids: jax.Array | None) -> None:
    """Raise a ValueError naming ``caller`` unless q is [B, T, H, D], k and v [B, T, Hkv, D]
    with Hkv dividing H, and segment_ids None or [B, T]."""
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"{caller}: q {q.shape} needs k and v [B, T, Hkv, D] with Hkv "
                         f"dividing H; got k {k.shape}, v {v.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"{caller}: segment_ids {segment_ids.shape} must be [B, T] = "
                         f"{(b, t)}")


class _Blocks:
    """Blocks of ``size`` rows of x along ``axis``, read by block index: a dynamic slice in
    the looped program (traced index); in the unrolled one, a list of blocks split off once
    behind an optimization barrier, so that no fusion reads a slice of the whole array (the
    recorded AOT results were compiled with it)."""

    def __init__(self, x: jax.Array | None, size: int, axis: int, unroll: bool) -> None:
        self.x, self.size, self.axis = x, size, axis
        self.parts = None
        if unroll and x is not None:
            self.parts = jax.lax.optimization_barrier(
                jnp.split(x, x.shape[axis] // size, axis=axis))

    def __getitem__(self, i) -> jax.Array | None:
        if self.x is None:
            return None
        if self.parts is not None:
            return self.parts[i]
        return jax.lax.dynamic_slice_in_dim(self.x, i * self.size, self.size, axis=self.axis)


def _allowed(seg_q, seg_k, q_start, block_q: int, k_start, block_k: int) -> jax.Array:
    """[B or 1, 1, 1, block_q, block_k] bool: causal, and the same segment when the blocks'
    segment ids ([B, block_q], [B, block_k]) are given."""
    q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)
    k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
    allowed = (q_pos[:, None] >= k_pos[None, :])[None, None, None]
    if seg_q is not None:
        allowed = allowed & (seg_q[:, :, None] == seg_k[:, None])[:, None, None]
    return allowed


def _logits(q_blk: jax.Array, k_blk: jax.Array, allowed: jax.Array, scale: float) -> jax.Array:
    """[B, J, G, bq, bk] float32 logits, -inf where not allowed (masked before any exp)."""
    s = jnp.einsum("bjgqd,bjkd->bjgqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    return jnp.where(allowed, s * scale, -jnp.inf)


def _key_blocks_seen(i, block_q: int, block_k: int, n_k: int, shift=0):
    """Key blocks that query block i sees: those starting at or before its last row, 0 .. this
    - 1. ``shift`` is the queries' first position minus the keys' (0 for self-attention)."""
    seen = (shift + (i + 1) * block_q + block_k - 1) // block_k
    if isinstance(seen, int):
        return max(0, min(n_k, seen))
    return jnp.clip(seen, 0, n_k)


def _first_query_block(kb, block_q: int, block_k: int, n_q: int, shift=0):
    """The first query block that sees key block kb: the first whose last row is at or after
    the block's first key (``shift`` as in ``_key_blocks_seen``)."""
    first = (kb * block_k - shift) // block_q
    if isinstance(first, int):
        return max(0, min(n_q, first))
    return jnp.clip(first, 0, n_q)


def _fori(lower, upper, body, init, unroll: bool):
    """``jax.lax.fori_loop``, or a Python loop over static bounds when ``unroll``."""
    if not unroll:
        return jax.lax.fori_loop(lower, upper, body, init)
    for index in range(lower, upper):
        init = body(index, init)
    return init


class Offsets(NamedTuple):
    """First positions of a piece of queries and a piece of keys in their sequence: ints, or
    int32 scalars inside ``shard_map`` (context parallelism; then not with ``unroll``). Keys
    after a query are masked, and blocks wholly after it are skipped."""

    q: Any = 0
    k: Any = 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(qh, kh, vh, seg, scale, block_q, block_k, unroll):
    """qh [B, J, G, T, D], kh and vh [B, J, T, D], seg [B, T] int32 or None -> [B, J, G, T, D]
    in qh's dtype; T a multiple of both blocks."""
    return _forward(qh, kh, vh, seg, scale, block_q, block_k, unroll)[0]


def _forward(qh, kh, vh, seg, scale, block_q, block_k, unroll):
    o, lse = attend_blocks(qh, kh, vh, seg, seg, Offsets(), scale, block_q, block_k, unroll,
                           out_dtype=qh.dtype)
    return o, (qh, kh, vh, seg, o, lse)


def _backward(scale, block_q, block_k, unroll, res, d_o):
    qh, kh, vh, seg, o, lse = res
    # softmax's VJP needs sum_k p dp per row, which is sum_d o do: a [T, D] product.
    delta = jnp.sum(o.astype(jnp.float32) * d_o.astype(jnp.float32), axis=-1)  # [B, J, G, T]
    d_q, d_k, d_v = attend_blocks_vjp(qh, kh, vh, seg, seg, Offsets(), lse, delta, d_o, scale,
                                      block_q, block_k, unroll)
    d_seg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return d_q.astype(qh.dtype), d_k.astype(kh.dtype), d_v.astype(vh.dtype), d_seg


_attention.defvjp(_forward, _backward)


def attend_blocks(qh: jax.Array, kh: jax.Array, vh: jax.Array, seg_q: jax.Array | None,
                  seg_k: jax.Array | None, offsets: Offsets, scale: float, block_q: int,
                  block_k: int, unroll: bool = False, out_dtype: Any = jnp.float32
                  ) -> tuple[jax.Array, jax.Array]:
    """One piece of queries against one piece of keys, flash attention's forward in blocks.

    qh [B, J, G, Tq, D] (query head j*G+g uses kv head j), kh and vh [B, J, Tk, D], seg_q
    [B, Tq] and seg_k [B, Tk] int32 or both None; Tq a multiple of block_q, Tk of block_k.
    Returns (o [B, J, G, Tq, D] in ``out_dtype``, lse [B, J, G, Tq] float32): the softmax-weighted
    values and each row's log-sum-exp over the keys it sees. A row that sees no key gets
    o = 0 and lse = float32's lowest value (finite), which weighs nothing in a merge."""
    b, j, g, tq, d = qh.shape
    n_q, n_k = tq // block_q, kh.shape[2] // block_k
    shift = offsets.q - offsets.k
    f32 = jnp.float32
    qs = _Blocks(qh, block_q, 3, unroll)
    ks, vs = _Blocks(kh, block_k, 2, unroll), _Blocks(vh, block_k, 2, unroll)
    seg_qs, seg_ks = _Blocks(seg_q, block_q, 1, unroll), _Blocks(seg_k, block_k, 1, unroll)
    # A finite start for the running max: a row with nothing allowed yet keeps it, its
    # exp(-inf - start) terms are 0 and its correction exp(start - max) is finite.
    lowest = jnp.finfo(f32).min

    def query_block(i):
        q_blk = qs[i]

        def key_block(kb, carry):
            row_max, row_sum, acc = carry
            allowed = _allowed(seg_qs[i], seg_ks[kb], shift + i * block_q, block_q,
                               kb * block_k, block_k)
            s = _logits(q_blk, ks[kb], allowed, scale)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_max[..., None])
            correction = jnp.exp(row_max - new_max)
            row_sum = correction * row_sum + jnp.sum(p, axis=-1)
            acc = correction[..., None] * acc + jnp.einsum(
                "bjgqk,bjkd->bjgqd", p.astype(vh.dtype), vs[kb], preferred_element_type=f32)
            return new_max, row_sum, acc

        init = (jnp.full((b, j, g, block_q), lowest, f32), jnp.zeros((b, j, g, block_q), f32),
                jnp.zeros((b, j, g, block_q, d), f32))
        row_max, row_sum, acc = _fori(0, _key_blocks_seen(i, block_q, block_k, n_k, shift),
                                      key_block, init, unroll)
        row_sum = jnp.where(row_sum > 0, row_sum, 1.0)
        return (acc / row_sum[..., None]).astype(out_dtype), row_max + jnp.log(row_sum)

    if unroll:
        o, lse = (jnp.stack(x) for x in zip(*(query_block(i) for i in range(n_q))))
    else:
        o, lse = jax.lax.map(query_block, jnp.arange(n_q))  # [n_q, B, J, G, bq, ...]
    return (jnp.moveaxis(o, 0, 3).reshape(b, j, g, tq, d),
            jnp.moveaxis(lse, 0, 3).reshape(b, j, g, tq))


def attend_blocks_vjp(qh: jax.Array, kh: jax.Array, vh: jax.Array, seg_q: jax.Array | None,
                      seg_k: jax.Array | None, offsets: Offsets, lse: jax.Array,
                      delta: jax.Array, d_o: jax.Array, scale: float, block_q: int,
                      block_k: int, unroll: bool = False,
                      into: tuple[jax.Array, jax.Array, jax.Array] | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cotangents of one query piece against one key piece, given the rows' final
    ``lse`` and ``delta`` = sum_d o do ([B, J, G, Tq] float32: over every key piece, when a
    row's keys are split into several), and d_o [B, J, G, Tq, D]. Shapes and offsets as
    ``attend_blocks``. Returns float32 (d_q [B, J, G, Tq, D], d_k, d_v [B, J, Tk, D]): this
    pair's share, to be summed over key pieces (d_q) and query pieces (d_k, d_v), or with
    ``into`` (float32 arrays of those shapes) that share added to them, without a buffer of
    its own for the sum (a ring's running cotangents)."""
    b, j, g, tq, d = qh.shape
    tk = kh.shape[2]
    n_q, n_k = tq // block_q, tk // block_k
    shift = offsets.q - offsets.k
    f32 = jnp.float32
    qs, d_os = _Blocks(qh, block_q, 3, unroll), _Blocks(d_o, block_q, 3, unroll)
    lses, deltas = _Blocks(lse, block_q, 3, unroll), _Blocks(delta, block_q, 3, unroll)
    ks, vs = _Blocks(kh, block_k, 2, unroll), _Blocks(vh, block_k, 2, unroll)
    seg_qs, seg_ks = _Blocks(seg_q, block_q, 1, unroll), _Blocks(seg_k, block_k, 1, unroll)

    d_k0, d_v0 = (None, None) if into is None else (
        _Blocks(into[1], block_k, 2, unroll), _Blocks(into[2], block_k, 2, unroll))

    def key_block(d_q, kb):
        k_blk, v_blk = ks[kb], vs[kb]

        def query_block(i, carry):
            d_k, d_v, d_q = carry
            q_blk, do_blk = qs[i], d_os[i]
            allowed = _allowed(seg_qs[i], seg_ks[kb], shift + i * block_q, block_q,
                               kb * block_k, block_k)
            s = _logits(q_blk, k_blk, allowed, scale)
            p = jnp.exp(s - lses[i][..., None])  # masked: exp(-inf) = 0
            d_v = d_v + jnp.einsum("bjgqk,bjgqd->bjkd", p.astype(vh.dtype), do_blk,
                                   preferred_element_type=f32)
            d_p = jnp.einsum("bjgqd,bjkd->bjgqk", do_blk, v_blk, preferred_element_type=f32)
            d_s = (p * (d_p - deltas[i][..., None]) * scale).astype(qh.dtype)
            d_k = d_k + jnp.einsum("bjgqk,bjgqd->bjkd", d_s, q_blk, preferred_element_type=f32)
            d_q_add = jnp.einsum("bjgqk,bjkd->bjgqd", d_s, k_blk, preferred_element_type=f32)
            if unroll:  # one sum per query block
                return d_k, d_v, [*d_q[:i], d_q[i] + d_q_add, *d_q[i + 1:]]
            rows = i * block_q  # updated in place inside XLA's loop
            d_q_blk = jax.lax.dynamic_slice_in_dim(d_q, rows, block_q, axis=3) + d_q_add
            return d_k, d_v, jax.lax.dynamic_update_slice_in_dim(d_q, d_q_blk, rows, axis=3)

        zeros = jnp.zeros((b, j, block_k, d), f32)
        start = (zeros, zeros) if into is None else (d_k0[kb], d_v0[kb])
        first = _first_query_block(kb, block_q, block_k, n_q, shift)
        d_k, d_v, d_q = _fori(first, n_q, query_block, (*start, d_q), unroll)
        return d_q, (d_k, d_v)

    d_q0 = jnp.zeros(qh.shape, f32) if into is None else into[0]
    if unroll:
        d_q, d_kv = jnp.split(d_q0, n_q, axis=3), []
        for kb in range(n_k):
            d_q, pair = key_block(d_q, kb)
            d_kv.append(pair)
        d_q = jnp.concatenate(d_q, axis=3)
        d_k, d_v = (jnp.stack(x) for x in zip(*d_kv))
    else:
        d_q, (d_k, d_v) = jax.lax.scan(key_block, d_q0, jnp.arange(n_k))
    return (d_q, jnp.moveaxis(d_k, 0, 2).reshape(b, j, tk, d),
            jnp.moveaxis(d_v, 0, 2).reshape(b, j, tk, d))
