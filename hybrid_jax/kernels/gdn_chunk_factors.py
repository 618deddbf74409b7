"""Pallas kernel: everything local to one chunk of the gated delta rule, fused.

One program per (sequence, chunk) computes, from the chunk's q, k, v, g, beta and segment
index, what the pass across chunks needs (``hybrid_jax.ops.gdn_common.ChunkFactors``):

    decay_log[i, j] = sum_{j < t <= i} g_t        (one matmul: summed directly, no cancellation)
    A = strict_tril(beta_i (k_i . k_j) exp(decay_log))   masked (causal, same segment) before exp
    T = (I + A)^-1                                 exact block inverses, doubled level by level
    u = T (beta v);  w = T (beta exp(gamma) k);  intra = scale (q k^T) exp(decay_log)
    q_decayed = scale exp(gamma) q;  k_decayed = exp(gamma_C - gamma) k;  chunk_decay = exp(gamma_C)

with segment resets zeroing every term that would cross a segment start. Its slow,
obviously-right twin is ``chunk_factors`` in XLA (tests compare the two).

Written for both Pallas backends: the chunk is the block on a parallel grid, and the solve
works on whole [C, C] tiles with masks (Triton lowers no slices, and rejects [1, C] dots).
The GPU variant (Triton lowering) ran on an H200 (experiments/RESULTS.md): at OLMo Hybrid's
layer the forward takes 0.59 ms (0.56 without any solve). The VJP took 4.0 ms as one kernel
(2.7 without its solve), far above what its memory traffic needs: compiled for sm_90a it
spilled 3 KB of registers per thread (experiments/kernel_registers.py). It is now three
kernels that take T from the backward's recompute of the factors instead of solving again,
and at OLMo's Dk = 96 (no longer padded to 128: column blocks of 64 and 32) spill 0, 16 and
0 bytes per thread (the forward 44); their speed is not yet measured on a GPU. The TPU
variant is verified in interpret mode and compiled by Mosaic ahead of time for v5e, v5p and
v6e (experiments/RESULTS.md, TPU pods), never yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import (
    BLOCK_COLUMNS,
    chunk_block,
    column_blocks,
    compiler_params,
    cost_estimate,
    dot_dtype,
    in_own_program,
    mm_exact_mask,
    mm_pieces,
    sequence_block,
    solve_flops,
    solve_matmul,
    solve_passes,
    solve_pieces,
)
from hybrid_jax.kernels.common import mm as _mm


def _unit_lower_inverse(a: jax.Array, row: jax.Array, col: jax.Array, matmul) -> jax.Array:
    """(I + A)^-1 for strictly lower triangular A [C, C] (C a power of two), float32: the twin
    of ``gdn_common.unit_lower_inverse``.

    Recursive doubling of exact block inverses, all on whole [C, C] tiles with masks (Triton
    lowers no slices): X starts as the inverse of I + A's 2x2 diagonal blocks, then each level
    inverts the diagonal blocks twice as large from the two halves' inverses,

        [[D1, 0], [L, D2]]^-1 = [[D1^-1, 0], [-D2^-1 L D1^-1, D2^-1]]:  X <- X - (X L) X,

    with L the next level's off-diagonal block (X is block diagonal, so one pair of [C, C]
    matmuls does every block). log2(C) - 1 levels (10 matmuls for C = 64) replace C - 1
    sequential substitution steps, and every intermediate is a product of the inverse's own
    blocks with A's (no power series, which overflows for large |A|). ``matmul`` is
    ``common.solve_matmul``: three bf16 passes for 16-bit inputs, float32 otherwise.
    """
    c = a.shape[0]
    if c & (c - 1):
        raise ValueError(f"chunk size must be a power of two for the kernels, got {c}")
    block = lambda x, level: jax.lax.shift_right_logical(x, jnp.int32(level))
    x = jnp.where(row == col, 1.0, 0.0) - jnp.where(block(row, 1) == block(col, 1), a, 0.0)
    level = 2
    while (1 << level) <= c:
        off = (block(row, level) == block(col, level)) & (
            block(row, level - 1) != block(col, level - 1))
        x = x - matmul(matmul(x, jnp.where(off, a, 0.0)), x)
        level += 1
    return x


def _gates(g, seg, row, col):
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
    from_start = _from_start(g, seg, causal)
    to_end = jnp.where(last, jnp.exp(jnp.where(last, to_end_log, 0.0)), 0.0)
    chunk_decay = jnp.where(seg_last == 0, jnp.exp(jnp.sum(g)), 0.0) * jnp.ones((1, 1), f32)
    return decay, from_start, to_end, chunk_decay


def _from_start(g, seg, causal):
    """exp(gamma) [C, 1], gamma[i] = sum_{t <= i} g_t, inside the chunk's first segment (0
    elsewhere): the decay from the chunk's start (``_gates``' from_start alone)."""
    gamma = jnp.sum(jnp.where(causal, g.T, 0.0), axis=1, keepdims=True)  # [C, 1]
    first = seg == 0
    return jnp.where(first, jnp.exp(jnp.where(first, gamma, 0.0)), 0.0)


def _iotas(c: int):
    return (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0),
            jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _products(a_ref, b_ref, width: int) -> jax.Array:
    """a b^T [C, C] float32 over blocks of ``width`` columns (operands in the inputs' dtype),
    from fresh loads (so a product used twice can be recomputed instead of kept live)."""
    out = 0.0
    for cols in column_blocks(a_ref.shape[-1], width):
        out = out + _mm(a_ref[:, cols], b_ref[:, cols].T)
    return out


def _keys_matrix(k_ref, beta, decay, row, col, width: int) -> jax.Array:
    """A [C, C] float32 = strict_tril(beta_i (k_i . k_j) decay_ij)."""
    return jnp.where(row > col, beta * _products(k_ref, k_ref, width) * decay, 0.0)


def _sum_cols(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1, keepdims=True)


def _kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref,
            u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, *inv_t_refs, scale: float,
            width: int):
    f32 = jnp.float32
    dt = u_ref.dtype  # matmul operand dtype: the inputs' (bf16) or float32
    beta = _column(beta_ref)  # [C, 1]
    row, col = _iotas(q_ref.shape[0])
    decay, from_start, to_end, chunk_decay = _gates(_column(g_ref), _column(seg_ref), row, col)
    # A first, then the intra-chunk output written before the solve: neither q k^T nor the
    # decays stay live through it (fewer registers spilled on GPU).
    a = _keys_matrix(k_ref, beta, decay, row, col, width)
    intra_ref[...] = (scale * _products(q_ref, k_ref, width) * decay).astype(dt)
    inv = _unit_lower_inverse(a, row, col, solve_matmul(k_ref.dtype))
    if inv_t_refs:  # for the VJP: T^T as the matmul pieces its products take
        for ref, piece in zip(inv_t_refs, solve_pieces(inv.T, q_ref.dtype)):
            ref[...] = piece

    # Head dims in blocks of ``width`` columns: whole [C, 256] float32 tiles would not fit a
    # GPU program's registers.
    for cols in column_blocks(v_ref.shape[-1], width):
        u_ref[:, cols] = _mm(inv, beta * v_ref[:, cols].astype(f32), dt).astype(dt)
    for cols in column_blocks(k_ref.shape[-1], width):
        k = k_ref[:, cols].astype(f32)
        w_ref[:, cols] = _mm(inv, beta * from_start * k, dt).astype(dt)
        qd_ref[:, cols] = (scale * from_start * q_ref[:, cols].astype(f32)).astype(dt)
        kd_ref[:, cols] = (to_end * k).astype(dt)
    decay_ref[...] = chunk_decay


def _backward_solve_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, du_ref, dw_ref,
                           dqd_ref, dkd_ref, *refs, scale: float, width: int):
    """The VJP's first part, through the solve: given (I + A)^-1 = T as the pieces of T^T that
    the forward kernel wrote (``refs``' first one or two; its products take them as they are),
    u = T (beta v), w = T (beta fs k) give dv, dA = -T^T dT T^T (on A's strictly lower
    support), and the per-row sums: dbeta's u/w terms, d from_start, d to_end. Sums and
    results are float32, save dv in v's dtype (d_u and d_w come as matmul operands in the
    inputs' dtype)."""
    *inv_t_refs, dv_ref, d_a_ref, dbeta_ref, d_fs_ref, d_te_ref = refs
    f32 = jnp.float32
    dt = dot_dtype(q_ref.dtype)
    beta = _column(beta_ref)
    row, col = _iotas(q_ref.shape[0])
    from_start = _from_start(_column(g_ref), _column(seg_ref), row >= col)
    inv_t = lambda: tuple(ref[...] for ref in inv_t_refs)  # fresh loads: nothing kept live
    # The forward's u = T (beta v) and w = T (beta fs k) take T's leading piece (bf16 for bf16
    # inputs), so their cotangents do too: d(beta v) = T0^T du, d(beta fs k) = T0^T dw.
    for cols in column_blocks(v_ref.shape[-1], width):
        dv_ref[:, cols] = (beta * _mm(inv_t_refs[0][...], du_ref[:, cols], dt)
                           ).astype(dv_ref.dtype)
    # Everything else needs only two [C, C] sums over the value and key columns, v_du = v du^T
    # and k_dw = k dw^T (no per-column products with T kept live beside them), with rows
    # scaled by the [C, 1] columns beta and fs:
    #   dT = (beta (v_du + fs k_dw))^T;  rowsum(v * T0^T du) = rowsum(T0^T * v_du), same for k.
    v_du = k_dw = d_from_start = d_to_end = 0.0
    for cols in column_blocks(v_ref.shape[-1], width):
        v_du = v_du + _mm(v_ref[:, cols], du_ref[:, cols].T, dt)
    for cols in column_blocks(k_ref.shape[-1], width):
        k_dw = k_dw + _mm(k_ref[:, cols], dw_ref[:, cols].T, dt)
        q, k = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32)
        d_from_start = d_from_start + scale * _sum_cols(q * dqd_ref[:, cols])
        d_to_end = d_to_end + _sum_cols(k * dkd_ref[:, cols])
    t0 = inv_t_refs[0][...].astype(f32)
    k_d_bk = _sum_cols(t0 * k_dw)  # rowsum(k * T0^T dw)
    d_fs_ref[...] = (d_from_start + beta * k_d_bk).T
    both = v_du + from_start * k_dw
    dbeta_ref[...] = _sum_cols(t0 * both).T
    d_inv = (beta * both).T
    d_inv_t = solve_pieces(mm_pieces(solve_pieces(d_inv, q_ref.dtype), inv_t()), q_ref.dtype)
    d_a_ref[...] = jnp.where(row > col, -mm_pieces(inv_t(), d_inv_t), 0.0)
    d_te_ref[...] = d_to_end.T


def _backward_gates_kernel(q_ref, k_ref, g_ref, beta_ref, seg_ref, dintra_ref, ddecay_ref,
                           d_a_ref, dbeta_ref, d_fs_ref, d_te_ref, dg_ref, dbeta_out_ref,
                           d_qk_ref, d_kk_ref, from_start_ref, to_end_ref, *,
                           scale: float, width: int):
    """The VJP's second part: from dA and d intra, through A = strict(beta kk decay) and
    intra = scale qk decay: dbeta, d(k k^T), d(q k^T), then the gates (dg) through each
    masked exp (masked entries are zero, so their cotangents vanish there). Writes d_qk and
    d_kk + d_kk^T as matmul operands, and the decays from the chunk's start and to its end,
    for ``_backward_columns_kernel``."""
    f32 = jnp.float32
    beta = _column(beta_ref)
    row, col = _iotas(q_ref.shape[0])
    causal, strict = row >= col, row > col
    decay, from_start, to_end, chunk_decay = _gates(_column(g_ref), _column(seg_ref), row, col)
    # In an order that keeps few [C, C] tiles live (on GPU, registers): with M = dA * decay,
    # d(k k^T) = beta M, dbeta = rowsum(M kk), d(q k^T) = scale d_intra decay, and the decays'
    # log cotangent d_log = beta M kk + d(q k^T) qk.
    m = d_a_ref[...] * decay
    d_kk = beta * m
    d_kk_ref[...] = (d_kk + d_kk.T).astype(d_kk_ref.dtype)
    m = m * _products(k_ref, k_ref, width)
    dbeta_out_ref[...] = (_column(dbeta_ref) + _sum_cols(m)).T
    d_qk = scale * dintra_ref[...] * decay
    d_qk_ref[...] = d_qk.astype(d_qk_ref.dtype)
    # d decay_log[i, j]; decay_log[i, j] sums g_t over j < t <= i
    d_log = beta * m + d_qk * _products(q_ref, k_ref, width)
    per_t = mm_exact_mask(d_log, row < col)  # [i, t] = sum_{j < t} d_log[i, j]
    dg = jnp.sum(jnp.where(causal, per_t, 0.0), axis=0, keepdims=True).T  # sum over i >= t
    d_gamma = _column(d_fs_ref) * from_start  # gamma[i] sums g_t over t <= i
    dg = dg + jnp.sum(jnp.where(causal, d_gamma, 0.0), axis=0, keepdims=True).T
    d_to_end_log = d_te_ref[...] * to_end.T  # [1, C]; to_end_log[j] sums g_t over t > j
    dg = dg + jnp.sum(jnp.where(strict, d_to_end_log, 0.0), axis=1, keepdims=True)
    dg_ref[...] = (dg + ddecay_ref[...] * chunk_decay).T
    from_start_ref[...] = from_start.T
    to_end_ref[...] = to_end.T


def _backward_columns_kernel(q_ref, k_ref, beta_ref, dw_ref, dqd_ref, dkd_ref, inv_t_ref,
                             d_qk_ref, d_kk_ref, from_start_ref, to_end_ref, dq_ref, dk_ref, *,
                             scale: float, width: int):
    """dq and dk for one block of key columns (program ``program_id(2)`` of the chunk's; a
    static slice of its whole rows, so the last block may be narrower), from the chunk's
    [C, C] cotangents (``_backward_solve_kernel``, ``_backward_gates_kernel``):
    dq = d_qk k + scale fs dqd;  dk = beta fs T^T dw + d_qk^T q + (d_kk + d_kk^T) k + te dkd."""
    f32 = jnp.float32
    dt = d_qk_ref.dtype

    def key_block(cols):
        q, k = q_ref[:, cols].astype(f32), k_ref[:, cols].astype(f32)
        d_qk, from_start = d_qk_ref[...], _column(from_start_ref)
        dq_ref[:, cols] = (_mm(d_qk, k, dt)
                           + scale * from_start * dqd_ref[:, cols]).astype(dq_ref.dtype)
        dk_ref[:, cols] = (
            _column(beta_ref) * from_start * _mm(inv_t_ref[...], dw_ref[:, cols], dt)
            + _mm(d_qk.T, q, dt) + _mm(d_kk_ref[...], k, dt)
            + _column(to_end_ref) * dkd_ref[:, cols]).astype(dk_ref.dtype)

    in_own_program(pl.program_id(2), q_ref.shape[-1], width, key_block)


def _token_blocks(q: jax.Array, heads: int | None):
    """(blocks of v's layout, blocks of q's and k's): ``common.sequence_block`` for sequences,
    or token-major with H = ``heads`` value heads and q, k holding H / group key heads."""
    if heads is not None and heads % q.shape[2]:
        raise ValueError(f"chunk factors: {heads} value heads do not group evenly over "
                         f"q's and k's {q.shape[2]} heads")
    group = 1 if heads is None else heads // q.shape[2]
    return (functools.partial(sequence_block, heads=heads),
            functools.partial(sequence_block, heads=heads, group=group))


def _rows(x: jax.Array) -> jax.Array:
    """[R, N, C] -> [R, N, 1, C]: per-position values as one row per chunk. Lane-dense: a
    [C, 1] column block per chunk would be padded to 128 lanes per position in TPU memory
    (480 MiB instead of 3.75 for one such array at OLMo's layer and 32k tokens)."""
    return x[..., None, :]


def _column(ref) -> jax.Array:
    """A chunk's per-position values, stored as a [1, C] row block, as a [C, 1] column."""
    return ref[...].T


@functools.partial(jax.jit, static_argnames=("scale", "backend", "return_inverse",
                                           "heads", "interpret"))
def chunk_factors_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                         beta: jax.Array, seg: jax.Array, *, scale: float, backend: str = "gpu",
                         return_inverse: bool = False, heads: int | None = None,
                         interpret=False):
    """Per-chunk factors for every chunk of every sequence.

    Args:
      q, k: [R, N, C, Dk]; v: [R, N, C, Dv] (float32 or bfloat16); g, beta: [R, N, C] float32;
      seg: [R, N, C] int32 segment index inside each chunk (all 0 without resets).
      heads: given, q, k and v are token-major instead, [B, N * C, H, D] with R = B * H
        (``common.sequence_block``; GPU: no transposes), q and k possibly with fewer heads, a
        divisor of H (each serving a group of consecutive value heads, read unrepeated);
        the rest is as above.
      backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU), see ``common.compiler_params``.
      interpret: True, or ``pltpu.InterpretParams`` (TPU semantics), to run on CPU.
      return_inverse: also return each chunk's T^T, T = (I + A)^-1, for
        ``chunk_factors_backward_kernel``.
    Returns:
      (u [R, N, C, Dv], w, q_decayed, k_decayed [R, N, C, Dk], intra [R, N, C, C]) in the
      matmul operand dtype (``common.dot_dtype(q.dtype)``: bf16 for bf16 inputs, else
      float32), and chunk_decay [R, N] float32. Everything before (gates, decays, the solve)
      is float32. With ``return_inverse``, then T^T [R, N, C, C] as the pieces the solve's
      products take (``common.solve_pieces``): bf16 (hi, lo) for 16-bit inputs, one float32
      array otherwise.
    """
    r, n, c = g.shape
    dk, dv = q.shape[-1], v.shape[-1]
    tok, keys = _token_blocks(q, heads)

    f32, dt = jnp.float32, dot_dtype(q.dtype)
    operands = (q, k, v, _rows(g.astype(f32)), _rows(beta.astype(f32)),
                _rows(seg.astype(jnp.int32)))
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), dt),
                 *[jax.ShapeDtypeStruct((r, n, c, dk), dt)] * 3,
                 jax.ShapeDtypeStruct((r, n, c, c), dt),
                 jax.ShapeDtypeStruct((r, n, 1, 1), f32)]
    out_specs = [chunk_block(c, dv), chunk_block(c, dk), chunk_block(c, dk), chunk_block(c, dk),
                 chunk_block(c, c), chunk_block(1, 1)]
    if return_inverse:
        pieces = 1 if dt == f32 else 2  # ``solve_pieces``: the float32 tile, or (hi, lo)
        out_shape += [jax.ShapeDtypeStruct((r, n, c, c), dt)] * pieces
        out_specs += [chunk_block(c, c)] * pieces
    # k k^T, q k^T, w: [C, C, Dk] products; u: [C, C, Dv]; plus the gates and the solve.
    flops = 2 * c * c * (3 * dk + dv) + solve_flops(c, q.dtype)
    u, w, qd, kd, intra, decay, *inv_t = pl.pallas_call(
        functools.partial(_kernel, scale=scale, width=BLOCK_COLUMNS[backend]),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), tok(c, dv), chunk_block(1, c), chunk_block(1, c),
                  chunk_block(1, c)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(backend, ("parallel", "parallel")),
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=interpret,
    )(*operands)
    return (u, w, qd, kd, intra, decay[..., 0, 0], *inv_t)


@functools.partial(jax.jit, static_argnames=("scale", "backend", "heads", "interpret"))
def chunk_factors_backward_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                                  beta: jax.Array, seg: jax.Array, d_u: jax.Array,
                                  d_w: jax.Array, d_q_decayed: jax.Array, d_k_decayed: jax.Array,
                                  d_intra: jax.Array, d_chunk_decay: jax.Array,
                                  inverse_t: tuple[jax.Array, ...] | None = None, *,
                                  scale: float, backend: str = "gpu",
                                  heads: int | None = None, interpret=False):
    """The VJP of ``chunk_factors_kernel``: returns (dq, dk [R, N, C, Dk], dv [R, N, C, Dv]) in
    the dtypes of q, k and v (each summed in float32 and rounded once, in the kernel), and
    (dg, dbeta [R, N, C]) float32. Inputs as for ``chunk_factors_kernel``; given ``heads``,
    q, k, v, dq, dk and dv are token-major [B, N * C, H, D] as there (dq and dk per value
    head: with grouped q and k, the caller sums each group). The cotangents have
    the factors' shapes (any float dtype; d_u and d_w are only matmul operands and are cast to
    the matmul dtype, the rest used as float32). ``inverse_t``: each chunk's T^T as
    ``chunk_factors_kernel(..., return_inverse=True)`` returns it (the backward's recompute of
    the factors gives it for 4 bytes per [C, C] entry); None runs that kernel here. The gates
    are recomputed. Three kernels, each small enough to stay in a GPU program's registers:
    per chunk, through the solve (dv, dA); per chunk, through the gates (dg, dbeta, and the
    [C, C] cotangents of q k^T and k k^T); per (chunk, block of key columns), dq and dk."""
    r, n, c = g.shape
    dk, dv = q.shape[-1], v.shape[-1]
    f32 = jnp.float32
    tok, keys = _token_blocks(q, heads)

    dt = dot_dtype(q.dtype)
    width = BLOCK_COLUMNS[backend]
    key_blocks = len(column_blocks(dk, width))
    if inverse_t is None:
        inverse_t = chunk_factors_kernel(q, k, v, g, beta, seg, scale=scale, backend=backend,
                                         return_inverse=True, heads=heads,
                                         interpret=interpret)[6:]
    inverse_t = tuple(inverse_t)
    params = compiler_params(backend, ("parallel", "parallel"))
    g_row, beta_row = _rows(g.astype(f32)), _rows(beta.astype(f32))
    seg_row = _rows(seg.astype(jnp.int32))
    d_u, d_w = d_u.astype(dt), d_w.astype(dt)
    d_q_decayed, d_k_decayed = d_q_decayed.astype(f32), d_k_decayed.astype(f32)
    per_row = lambda: jax.ShapeDtypeStruct((r, n, 1, c), f32)  # [R, N, 1, C] float32
    passes = solve_passes(q.dtype)
    operands = (q, k, v, g_row, beta_row, seg_row, d_u, d_w, d_q_decayed, d_k_decayed,
                *inverse_t)
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((r, n, c, c), f32), per_row(), per_row(), per_row()]
    # Two [C, C, Dv] and two [C, C, Dk] products, and dA's two.
    flops = 2 * c * c * (2 * dk + 2 * dv) + 4 * c ** 3 * passes
    dv_, d_a, dbeta, d_fs, d_te = pl.pallas_call(
        functools.partial(_backward_solve_kernel, scale=scale, width=width),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), tok(c, dv), chunk_block(1, c), chunk_block(1, c),
                  chunk_block(1, c),
                  chunk_block(c, dv), chunk_block(c, dk), chunk_block(c, dk), chunk_block(c, dk),
                  *[chunk_block(c, c)] * len(inverse_t)],
        out_specs=[tok(c, dv), chunk_block(c, c), *[chunk_block(1, c)] * 3],
        out_shape=out_shape,
        compiler_params=params,
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=interpret,
    )(*operands)
    operands = (q, k, g_row, beta_row, seg_row, d_intra.astype(f32),
                d_chunk_decay.astype(f32)[..., None, None], d_a, dbeta, d_fs, d_te)
    out_shape = [per_row(), per_row(), *[jax.ShapeDtypeStruct((r, n, c, c), dt)] * 2,
                 per_row(), per_row()]
    # k k^T, q k^T, the decay sums and dg's per-position sums (three bf16 passes each).
    flops = 2 * c * c * 2 * dk + 2 * 3 * 2 * c ** 3
    dg, dbeta, d_qk, d_kk, from_start, to_end = pl.pallas_call(
        functools.partial(_backward_gates_kernel, scale=scale, width=width),
        grid=(r, n),
        in_specs=[keys(c, dk), keys(c, dk), *[chunk_block(1, c)] * 3,
                  chunk_block(c, c), chunk_block(1, 1), chunk_block(c, c),
                  *[chunk_block(1, c)] * 3],
        out_specs=[chunk_block(1, c), chunk_block(1, c), chunk_block(c, c), chunk_block(c, c),
                   chunk_block(1, c), chunk_block(1, c)],
        out_shape=out_shape,
        compiler_params=params,
        cost_estimate=cost_estimate(r * n, flops, c * c + 2 * c, operands, out_shape),
        interpret=interpret,
    )(*operands)

    operands = (q, k, beta_row, d_w, d_q_decayed, d_k_decayed, inverse_t[0], d_qk, d_kk,
                from_start, to_end)
    per_value_head = (*v.shape[:-1], dk)  # [R, N, C, Dk], or [B, N * C, H, Dk]
    out_shape = [jax.ShapeDtypeStruct(per_value_head, q.dtype),
                 jax.ShapeDtypeStruct(per_value_head, k.dtype)]
    dq, dk_ = pl.pallas_call(
        functools.partial(_backward_columns_kernel, scale=scale, width=width),
        grid=(r, n, key_blocks),
        # Grid (R, N, key block): each program takes its key columns itself.
        in_specs=[keys(c, dk), keys(c, dk), chunk_block(1, c),
                  *[chunk_block(c, dk)] * 3, *[chunk_block(c, c)] * 3, chunk_block(1, c),
                  chunk_block(1, c)],
        out_specs=[tok(c, dk), tok(c, dk)],
        out_shape=out_shape,
        # The last axis is "arbitrary": its programs share output blocks (each writing its own
        # columns), which Mosaic TPU must not split across cores.
        compiler_params=compiler_params(backend, ("parallel", "parallel", "arbitrary")),
        # dq: one [C, C, Dk] product; dk: three.
        cost_estimate=cost_estimate(r * n, 4 * 2 * c * c * dk, 0, operands, out_shape),
        interpret=interpret,
    )(*operands)
    return dq, dk_, dv_, dg[..., 0, :], dbeta[..., 0, :]
