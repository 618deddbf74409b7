"""One chunk's gates, solve and products on whole [C, C] tiles, inside a kernel: what the
factor kernel (``chunk_factors``) and its VJP (``chunk_factors_vjp``) share.

Everything here runs on tiles with masks, no slices (Triton lowers none, and rejects [1, C]
dots); every exp is masked first; sums and the solve are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.pallas.plan import Layout
from hybrid_jax.gdn.pallas.tiles import column_blocks, mm, mm_exact_mask


def unit_lower_inverse_tile(a: jax.Array, row: jax.Array, col: jax.Array, matmul) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [C, C] (C a power of two), float32: the twin
    of ``gdn.chunk_factors.unit_lower_inverse``.

    Recursive doubling of exact block inverses, all on whole [C, C] tiles with masks (Triton
    lowers no slices): X starts as the inverse of I + A's 2x2 diagonal blocks, then each level
    inverts the diagonal blocks twice as large from the two halves' inverses,

        [[D1, 0], [L, D2]]^-1 = [[D1^-1, 0], [-D2^-1 L D1^-1, D2^-1]]:  X <- X - (X L) X,

    with L the next level's off-diagonal block (X is block diagonal, so one pair of [C, C]
    matmuls does every block). log2(C) - 1 levels (10 matmuls for C = 64) replace C - 1
    sequential substitution steps, and every intermediate is a product of the inverse's own
    blocks with A's (no power series, which overflows for large |A|). ``matmul`` is
    ``tiles.solve_matmul``: three bf16 passes for 16-bit inputs, float32 otherwise.
    """
    c = a.shape[0]
    block = lambda x, level: jax.lax.shift_right_logical(x, jnp.int32(level))
    x = jnp.where(row == col, 1.0, 0.0) - jnp.where(block(row, 1) == block(col, 1), a, 0.0)
    level = 2
    while (1 << level) <= c:
        off = (block(row, level) == block(col, level)) & (
            block(row, level - 1) != block(col, level - 1))
        x = x - matmul(matmul(x, jnp.where(off, a, 0.0)), x)
        level += 1
    return x


def gates(g, seg, row, col):
    """From a chunk's log gates g [C, 1] and segment indices seg [C, 1] (float32 / int32):
    (decay [C, C], from_start [C, 1], to_end [C, 1], chunk_decay [1, 1], masks), all float32.

    decay_log[i, j] = sum_t [t <= i] g_t [t > j] (one matmul: summed directly, no
    cancellation); gamma[i] = sum_{t <= i} g_t; to_end[j] = sum_{t > j} g_t. Every exp is
    masked first: pairs across a segment start, positions outside the first (last) segment.
    """
    f32 = jnp.float32
    causal, strict = row >= col, row > col
    decay_log = mm_exact_mask(jnp.where(causal, g.T, 0.0), strict)
    to_end_log = jnp.sum(jnp.where(strict, g, 0.0), axis=0, keepdims=True).T  # [C, 1]
    seg_last = jnp.max(seg)  # segment indices only grow along a chunk
    pair = causal & (seg == seg.T)
    last = seg == seg_last
    decay = jnp.exp(jnp.where(pair, decay_log, -jnp.inf))
    from_start = decay_from_start(g, seg, causal)
    to_end = jnp.where(last, jnp.exp(jnp.where(last, to_end_log, 0.0)), 0.0)
    chunk_decay = jnp.where(seg_last == 0, jnp.exp(jnp.sum(g)), 0.0) * jnp.ones((1, 1), f32)
    return decay, from_start, to_end, chunk_decay


def decay_from_start(g, seg, causal):
    """exp(gamma) [C, 1], gamma[i] = sum_{t <= i} g_t, inside the chunk's first segment (0
    elsewhere): the decay from the chunk's start (``gates``' from_start alone)."""
    gamma = jnp.sum(jnp.where(causal, g.T, 0.0), axis=1, keepdims=True)  # [C, 1]
    first = seg == 0
    return jnp.where(first, jnp.exp(jnp.where(first, gamma, 0.0)), 0.0)


def iotas(c: int) -> tuple[jax.Array, jax.Array]:
    """(row, col) index tiles [C, C] int32: the masks' coordinates."""
    return (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0),
            jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))


def products(a_ref, b_ref, width: int) -> jax.Array:
    """a b^T [C, C] float32 over blocks of ``width`` columns (operands in the inputs' dtype),
    from fresh loads (so a product used twice can be recomputed instead of kept live)."""
    out = 0.0
    for cols in column_blocks(a_ref.shape[-1], width):
        out = out + mm(a_ref[:, cols], b_ref[:, cols].T)
    return out


def keys_matrix(k_ref, beta, decay, row, col, width: int) -> jax.Array:
    """A [C, C] float32 = strict_tril(beta_i (k_i . k_j) decay_ij)."""
    return jnp.where(row > col, beta * products(k_ref, k_ref, width) * decay, 0.0)


def row_sums(x: jax.Array) -> jax.Array:
    """[C, M] -> [C, 1]: each row's sum."""
    return jnp.sum(x, axis=1, keepdims=True)


def as_rows(x: jax.Array) -> jax.Array:
    """[R, N, C] -> [R, N, 1, C]: per-position values as one row per chunk. Lane-dense: a
    [C, 1] column block per chunk would be padded to 128 lanes per position in TPU memory
    (128 times the bytes)."""
    return x[..., None, :]


def as_column(ref) -> jax.Array:
    """A chunk's per-position values, stored as a [1, C] row block, as a [C, 1] column."""
    return ref[...].T


def per_token_blocks(q: jax.Array, layout: Layout) -> tuple:
    """(blocks of v's layout, blocks of q's and k's): ``Layout.block``; token-major q and k
    hold H / group key heads, each read by its group of value heads."""
    if layout.token_major and layout.heads % q.shape[2]:
        raise ValueError(f"chunk factors: {layout.heads} value heads do not group evenly over "
                         f"q's and k's {q.shape[2]} heads")
    group = layout.heads // q.shape[2] if layout.token_major else 1
    return layout.block, functools.partial(layout.block, group=group)
