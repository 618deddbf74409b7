"""Pallas kernels: the chunked gated delta rule's pass across chunks, forward and backward,
with the state kept on chip.

The XLA ``chunk`` form (``hybrid_jax.ops.gdn_chunk``) scans over chunks with ``lax.scan``: every
chunk's [Dk, Dv] state goes back to memory between steps, and each step is several small XLA
ops. Here one kernel program owns one (batch row, head) and loops over its chunks with the state
in a loop carry (registers / on-chip memory), so per chunk it reads the chunk's factors once
and writes its output once. Forward, with S the state entering a chunk:

    v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay * S + k_decayed^T v_new

Backward, from the last chunk to the first, with G' = dL/dS' (starting from the final state's
cotangent) and dO the output's cotangent:

    dv_new = intra^T dO + k_decayed G';   G = chunk_decay * G' + q_decayed^T dO - w^T dv_new

Everything else in the gradient is local to a chunk given S, G' and dv_new (``gdn_pallas``
computes it). The per-chunk factors (the WY/UT solve, u, w, the intra-chunk attention, with
segment resets) come from ``gdn_chunk_factors`` (or XLA's ``gdn_common.chunk_factors``). The
slow, obviously-right twin is ``hybrid_jax.ops.gdn_chunk``'s scan step and its autodiff.

On GPU the forward's output can also come from its own parallel kernel, ``chunk_outputs``,
given the states the pass writes for the backward (``gdn_pallas.GPU_FORWARD_OUTPUT`` chooses).

Two variants of each pass, over one chunk step:
- ``state_pass`` / ``state_pass_backward`` (GPU, Triton lowering): one program per (row and
  head, block of value columns) loops over its chunks inside the kernel, reading each chunk
  from the whole-sequence arrays in global memory. The rule is independent across value
  columns, so splitting them keeps a [Dk, block_v] state in registers and gives the GPU more
  programs. The state is held as blocks of 64 key rows (the last one narrower), so the
  caller pads key dims only as far as that last block's width is a power of two, as Triton
  tiles must be (OLMo Hybrid's 96 is 64 + 32), and value dims to a multiple of the value
  block.
  Triton rather than Mosaic GPU because Mosaic GPU copies each block to shared memory
  whole, which a whole sequence cannot fit, and jax 0.10/0.11's Mosaic GPU ``pallas_call``
  path is deprecated in favour of ``plgpu.kernel``, whose structure (warp groups, explicit
  TMA pipelines) would be a separate kernel.
- ``state_pass_tpu`` / ``state_pass_backward_tpu`` (Mosaic TPU): the chunk axis is a
  sequential ("arbitrary") grid dimension (run backwards for the backward pass), each grid
  step gets one chunk's blocks in VMEM, and the state lives in a VMEM scratch that persists
  across the steps: whole sequences would not fit VMEM.
The GPU variants ran on an H200 (experiments/RESULTS.md); the TPU ones are verified in
interpret mode (with ``pltpu.InterpretParams``, which also detects races and out-of-bounds
reads) and compiled by Mosaic for v5e, v5p and v6e ahead of time (``hybrid_jax.aot.kernels``),
never yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.kernels.common import (
    BLOCK_COLUMNS,
    batch_and_head,
    chunk_block,
    column_blocks,
    compiler_params,
    cost_estimate,
    pipeline_stages,
    sequence_block,
)
from hybrid_jax.kernels.common import mm as _mm


# The GPU kernels hold the state as key blocks of rows ([64, block_v] tiles, the last one
# narrower): Triton tiles must be powers of two, and so Dk need not be (OLMo Hybrid's 96 is
# 64 + 32, not padded to 128). The Mosaic TPU kernels hold one block, the whole state.
def _key_blocks(dk: int) -> list:
    return column_blocks(dk, BLOCK_COLUMNS["gpu"])


def _advance(u, w, kd, decay, state):
    """One chunk: (v_new [C, Dv], next state) from its factors and the state entering it, w and
    k_decayed as tuples of [C, block] column blocks and the state as the matching tuple of
    [block, Dv] row blocks. The state and all sums are float32; matmul operands take the
    factors' dtype (bf16 for bf16 inputs: tensor cores)."""
    dt = u.dtype
    v_new = u.astype(jnp.float32)  # [C, Dv]
    for w_b, s_b in zip(w, state):
        v_new = v_new - _mm(w_b, s_b, dt)
    return v_new, tuple(decay * s_b + _mm(kd_b.T, v_new, dt) for kd_b, s_b in zip(kd, state))


def _output(qd, intra, state, v_new):
    """One chunk's output o [C, Dv] (float32) from the state entering it (key blocks, with
    q_decayed's matching column blocks) and its v_new."""
    dt = intra.dtype
    out = _mm(intra, v_new, dt)
    for qd_b, s_b in zip(qd, state):
        out = out + _mm(qd_b, s_b, dt)
    return out


def _chunk_step_backward(do, w, qd, kd, intra, decay, grad):
    """One chunk backwards: (dv_new [C, Dv], G) from the output's cotangent dO, the factors and
    G' = dL/d(state leaving the chunk), key blocks as in ``_advance``. Float32 sums, operands
    in intra's dtype."""
    dt = intra.dtype
    dv_new = _mm(intra.T, do, dt)
    for kd_b, g_b in zip(kd, grad):
        dv_new = dv_new + _mm(kd_b, g_b, dt)
    return dv_new, tuple(decay * g_b + _mm(qd_b.T, do, dt) - _mm(w_b.T, dv_new, dt)
                         for w_b, qd_b, g_b in zip(w, qd, grad))


def _columns(ref, n, keys):
    """Chunk n of a whole-sequence [N, C, Dk] block, as its key column blocks."""
    return tuple(ref[n, :, cols] for cols in keys)


def _load_rows(ref, keys):
    return tuple(ref[cols, :] for cols in keys)


def _store_rows(ref, keys, blocks, *chunk):
    """Key row blocks into a [Dk, block_v] block, or given ``chunk`` (n), into chunk n of a
    whole-sequence [N, Dk, block_v] one."""
    for cols, x in zip(keys, blocks):
        ref[(*chunk, cols, slice(None))] = x.astype(ref.dtype)


def _rows_of_chunk(ref, n, c: int):
    """Index of chunk n in a whole-sequence block: [N, C, block_v] of sequences, or the rows
    [N * C, block_v] of a token-major array (``_whole_tokens``)."""
    return n if len(ref.shape) == 3 else pl.ds(pl.multiple_of(n * c, c), c)


def _gpu_kernel(u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, s0_ref, o_ref, s_ref, *,
                n_chunks: int):
    keys = _key_blocks(w_ref.shape[-1])
    c = u_ref.shape[1]

    def chunk(n, state):
        v_new, next_state = _advance(u_ref[n], _columns(w_ref, n, keys),
                                     _columns(kd_ref, n, keys), decay_ref[n], state)
        o_ref[_rows_of_chunk(o_ref, n, c)] = _output(
            _columns(qd_ref, n, keys), intra_ref[n], state, v_new).astype(o_ref.dtype)
        return next_state

    _store_rows(s_ref, keys, jax.lax.fori_loop(0, n_chunks, chunk, _load_rows(s0_ref, keys)))


def _gpu_states_kernel(u_ref, w_ref, kd_ref, decay_ref, s0_ref, s_ref, states_ref, v_new_ref,
                       *, n_chunks: int):
    """The forward pass again for the backward: the states and v_new, no output."""
    keys = _key_blocks(w_ref.shape[-1])

    def chunk(n, state):
        _store_rows(states_ref, keys, state, n)
        v_new, state = _advance(u_ref[n], _columns(w_ref, n, keys), _columns(kd_ref, n, keys),
                                decay_ref[n], state)
        v_new_ref[n] = v_new.astype(v_new_ref.dtype)
        return state

    _store_rows(s_ref, keys, jax.lax.fori_loop(0, n_chunks, chunk, _load_rows(s0_ref, keys)))


def _gpu_backward_kernel(do_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, dfinal_ref,
                         dv_ref, grads_ref, ds0_ref, *, n_chunks: int):
    keys = _key_blocks(w_ref.shape[-1])
    c = dv_ref.shape[1]

    def chunk(j, grad):
        n = n_chunks - 1 - j
        _store_rows(grads_ref, keys, grad, n)  # G': cotangent of the state leaving n
        dv_new, grad = _chunk_step_backward(
            do_ref[_rows_of_chunk(do_ref, n, c)], _columns(w_ref, n, keys),
            _columns(qd_ref, n, keys),
            _columns(kd_ref, n, keys), intra_ref[n], decay_ref[n], grad)
        dv_ref[n] = dv_new.astype(dv_ref.dtype)
        return grad

    _store_rows(ds0_ref, keys,
                jax.lax.fori_loop(0, n_chunks, chunk, _load_rows(dfinal_ref, keys)))


def _tpu_kernel(*refs, save: bool):
    """One chunk per grid step, the state in a VMEM scratch (one key block: whole tiles);
    ``save``: the backward's pass (states and v_new written, no output)."""
    if save:
        (u_ref, w_ref, kd_ref, decay_ref, s0_ref, s_ref, states_ref, v_new_ref,
         state_ref) = refs
    else:
        (u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, s0_ref, o_ref, s_ref,
         state_ref) = refs
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    state = state_ref[...]
    v_new, (next_state,) = _advance(u_ref[...], (w_ref[...],), (kd_ref[...],), decay_ref[...],
                                    (state,))
    if save:
        states_ref[...] = state.astype(states_ref.dtype)
        v_new_ref[...] = v_new.astype(v_new_ref.dtype)
    else:
        o_ref[...] = _output((qd_ref[...],), intra_ref[...], (state,),
                             v_new).astype(o_ref.dtype)
    state_ref[...] = next_state

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        s_ref[...] = next_state


def _tpu_backward_kernel(do_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, dfinal_ref,
                         dv_ref, grads_ref, ds0_ref, grad_ref):
    j = pl.program_id(1)  # chunk N-1-j: the index maps run the chunks backwards

    @pl.when(j == 0)
    def _():
        grad_ref[...] = dfinal_ref[...]

    grads_ref[...] = grad_ref[...].astype(grads_ref.dtype)
    dv_new, (grad,) = _chunk_step_backward(do_ref[...], (w_ref[...],), (qd_ref[...],),
                                           (kd_ref[...],), intra_ref[...], decay_ref[...],
                                           (grad_ref[...],))
    dv_ref[...] = dv_new.astype(dv_ref.dtype)
    grad_ref[...] = grad

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = grad


def _block_v(dv: int, block_v: int, name: str) -> int:
    bv = min(block_v, dv)
    if dv % bv:
        raise ValueError(f"{name}: Dv={dv} is not a multiple of block_v={bv}")
    return bv


def _whole(*shape, split_v=False):
    """GPU block: the whole per-sequence array, one sequence (and value block) per program."""
    last = (lambda j: (j,)) if split_v else (lambda j: (0,))
    return pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * (len(shape) - 1) + last(j))


def _whole_tokens(t: int, bv: int, heads: int):
    """GPU block: a token-major [B, T, H, Dv] array's [T, block_v] for one sequence (batch row
    i // heads, head i % heads) and value block, its rows strided (``common.sequence_block``)."""
    def index(i, j):
        b, h = batch_and_head(i, heads)
        return b, 0, h, j

    return pl.BlockSpec((None, t, None, bv), index)


def _per_token_block(n: int, c: int, bv: int, heads: int | None):
    """GPU block of a per-token array (the output or its cotangent), in either layout."""
    return _whole(n, c, bv, split_v=True) if heads is None else _whole_tokens(n * c, bv, heads)


def _token_shape(r: int, n: int, c: int, d: int, heads: int | None) -> tuple:
    """A per-token array's shape: [R, N, C, d] sequences or token-major [B, N * C, H, d]."""
    return (r, n, c, d) if heads is None else (r // heads, n * c, heads, d)


def _gpu_in_specs(n: int, c: int, dk: int, bv: int, save: bool = False,
                  first: pl.BlockSpec | None = None) -> list:
    """Both GPU passes read a [C, block_v] slice per chunk (u, or dO: ``first``, its block if
    not u's), the [C, Dk] / [C, C] factors whole (``save``: w and k_decayed only), the
    per-chunk decay, and a [Dk, block_v] state (initial or final)."""
    factors = [_whole(n, c, dk)] * (2 if save else 3) + ([] if save else [_whole(n, c, c)])
    return [first or _whole(n, c, bv, split_v=True), *factors, _whole(n, 1, 1),
            _whole(dk, bv, split_v=True)]


def _stages(factors: tuple, bv: int, preferred: int) -> int:
    """Pipelining stages for a GPU pass whose loop loads, per chunk, a [C, block_v] slice in
    the factors' dtype and each of ``factors``' [C, Dk] or [C, C] blocks ([R, N, C, d]
    arrays, w first), and keeps the [Dk, block_v] state (or its cotangent) as a matmul
    operand: ``preferred`` at OLMo's layer in bf16, fewer where the buffers would not fit
    shared memory (Dk 192 or 256, float32 inputs)."""
    w = factors[0]
    c, dk = w.shape[-2:]
    size = jnp.dtype(w.dtype).itemsize
    per_stage = size * c * bv + sum(c * x.shape[-1] * jnp.dtype(x.dtype).itemsize
                                    for x in factors)
    return pipeline_stages(per_stage, preferred, resident_bytes=size * dk * bv)


def _per_seq(*shape):
    """TPU block: one sequence's [Dk, Dv] state (the same block at every chunk)."""
    return pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))


def _decay_blocks(chunk_decay: jax.Array) -> jax.Array:
    return chunk_decay.astype(jnp.float32)[:, :, None, None]  # [R, N, 1, 1]: a block per chunk


def _cost(operands, out_shape, save: bool = False) -> object:
    """Per chunk, either way: three [C, Dk, Dv] products (w S, q S, k^T v; backwards k G,
    q^T dO, w^T dv) and one [C, C, Dv] (intra v; backwards intra^T dO); ``save`` (no output):
    two [C, Dk, Dv] (w S, k^T v). Operands: (u or dO, w, ..., the initial or final state)."""
    r, n, c, dk = operands[1].shape
    dv = operands[-1].shape[-1]
    flops = 2 * 2 * c * dk * dv if save else 3 * 2 * c * dk * dv + 2 * c * c * dv
    return cost_estimate(r * n, flops, 0, operands, out_shape)


@functools.partial(jax.jit, static_argnames=("block_v", "return_states", "heads", "interpret"))
def state_pass(u: jax.Array, w: jax.Array, q_decayed: jax.Array, k_decayed: jax.Array,
               intra: jax.Array, chunk_decay: jax.Array, initial_state: jax.Array, *,
               block_v: int = 64, return_states: bool = False, heads: int | None = None,
               interpret: bool = False):
    """Run the state across chunks.

    Args (one leading axis R for the independent (row, head) sequences):
      u: [R, N, C, Dv]; w, q_decayed, k_decayed: [R, N, C, Dk]; intra: [R, N, C, C], all in
        one dtype (bf16 or float32), which the matmul operands take;
      chunk_decay: [R, N] and initial_state: [R, Dk, Dv], float32.
      block_v: value columns per program; the grid is (R, Dv / block_v).
      return_states: the backward's pass: instead of the output, the state entering each
        chunk and its corrected values v_new = u - w S (q_decayed and intra go unread).
      heads: given, the output is token-major, [B, N * C, H, Dv] with R = B * H
        (``common.sequence_block``: no transpose after the kernel).
      interpret: run the kernel body as ordinary JAX ops (CPU tests).
    Returns:
      (o [R, N, C, Dv] in u's dtype, final state [R, Dk, Dv] float32); with
      ``return_states``, (final state, the states entering each chunk [R, N, Dk, Dv], v_new
      [R, N, C, Dv]), the last two in u's dtype. The state is carried in float32; the stored
      copies are only the backward's matmul operands (save for sum(S * G'), which
      flash-linear-attention also forms from stored bf16 states), so for bf16 factors they
      are stored as bf16: half the memory and traffic.
    """
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    bv = _block_v(dv, block_v, "state_pass")
    final = (_whole(dk, bv, split_v=True), jax.ShapeDtypeStruct((r, dk, dv), jnp.float32))
    per_chunk = lambda rows: (_whole(n, rows, bv, split_v=True),
                              jax.ShapeDtypeStruct((r, n, rows, dv), u.dtype))
    if return_states:
        kernel, outs = _gpu_states_kernel, [final, per_chunk(dk), per_chunk(c)]
        factors = (w, k_decayed)
    else:
        out = (_per_token_block(n, c, bv, heads),
               jax.ShapeDtypeStruct(_token_shape(r, n, c, dv, heads), u.dtype))
        kernel, outs = _gpu_kernel, [out, final]
        factors = (w, q_decayed, k_decayed, intra)
    out_specs, out_shape = (list(x) for x in zip(*outs))
    operands = (u, *factors, _decay_blocks(chunk_decay), initial_state)
    return tuple(pl.pallas_call(
        functools.partial(kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=_gpu_in_specs(n, c, dk, bv, save=return_states),
        out_specs=out_specs,
        out_shape=out_shape,
        # Three pipelining stages prefetch further ahead: 0.55 -> 0.39 ms at OLMo's layer on an
        # H200 (bv=64); the backward pass measured slower with three (0.60 -> 0.65 ms).
        compiler_params=compiler_params("gpu", ("parallel", "parallel"),
                                        num_stages=_stages(factors, bv, 3)),
        cost_estimate=_cost(operands, out_shape, save=return_states),
        interpret=interpret,
    )(*operands))


def _gpu_output_kernel(qd_ref, intra_ref, states_ref, v_new_ref, o_ref):
    keys = _key_blocks(qd_ref.shape[-1])
    qd = tuple(qd_ref[:, cols] for cols in keys)
    o_ref[...] = _output(qd, intra_ref[...], _load_rows(states_ref, keys),
                         v_new_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_v", "heads", "interpret"))
def chunk_outputs(q_decayed: jax.Array, intra: jax.Array, states: jax.Array,
                  v_new: jax.Array, *, block_v: int = 64, heads: int | None = None,
                  interpret: bool = False) -> jax.Array:
    """Every chunk's output at once from the states entering the chunks (GPU, Triton lowering):
    the output half of ``state_pass``, for a forward that runs ``state_pass(...,
    return_states=True)`` and then this, as flash-linear-attention's forward does
    (``chunk_fwd_h`` then ``chunk_fwd_o``). The sequential pass then does two products per
    chunk instead of four, and these run on a (sequence, chunk, value block) grid of many
    programs; the price is writing and reading the states and v_new once more.

    Args:
      q_decayed: [R, N, C, Dk] and intra [R, N, C, C], the factors (their dtype is the matmul
        operands'); states: [R, N, Dk, Dv] and v_new [R, N, C, Dv], from ``state_pass``.
      block_v: value columns per program; heads: as for ``state_pass``.
    Returns:
      o [R, N, C, Dv] (or token-major) in v_new's dtype, float32-accumulated.
    """
    r, n, c, dk = q_decayed.shape
    dv = v_new.shape[-1]
    bv = _block_v(dv, block_v, "chunk_outputs")
    per_v = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda i, j, k: (i, j, 0, k))
    operands = (q_decayed, intra, states, v_new)
    out_shape = jax.ShapeDtypeStruct(_token_shape(r, n, c, dv, heads), v_new.dtype)

    def token_index(i, j, k):
        b, h = batch_and_head(i, heads)
        return b, j, h, k

    out_spec = per_v(c) if heads is None else pl.BlockSpec((None, c, None, bv), token_index)
    return pl.pallas_call(
        _gpu_output_kernel,
        grid=(r, n, dv // bv),
        in_specs=[chunk_block(c, dk), chunk_block(c, c), per_v(dk), per_v(c)],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params("gpu", ("parallel",) * 3),
        cost_estimate=cost_estimate(r * n * (dv // bv), 2 * c * (dk + c) * bv, 0, operands,
                                    [out_shape]),
        interpret=interpret,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("block_v", "heads", "interpret"))
def state_pass_backward(d_out: jax.Array, w: jax.Array, q_decayed: jax.Array,
                        k_decayed: jax.Array, intra: jax.Array, chunk_decay: jax.Array,
                        d_final: jax.Array, *, block_v: int = 64, heads: int | None = None,
                        interpret: bool = False):
    """The state pass backwards, last chunk first.

    Args:
      d_out: [R, N, C, Dv], the output's cotangent, in the factors' dtype (given ``heads``,
        token-major [B, N * C, H, Dv], as ``state_pass`` writes the output); w, q_decayed,
        k_decayed: [R, N, C, Dk] and intra [R, N, C, C] as for ``state_pass``;
      chunk_decay: [R, N] and d_final: [R, Dk, Dv] (the final state's cotangent), float32.
    Returns:
      dv_new [R, N, C, Dv], the cotangent of each chunk's corrected values (u - w S), and
      grads [R, N, Dk, Dv], the cotangent of the state leaving each chunk, both in w's dtype
      (the matmul operands they become; summed in float32, the running cotangent state too);
      d_initial [R, Dk, Dv] float32, the initial state's cotangent.
    """
    r, n, c, dk = w.shape
    dv = d_out.shape[-1]
    bv = _block_v(dv, block_v, "state_pass_backward")
    operands = (d_out, w, q_decayed, k_decayed, intra, _decay_blocks(chunk_decay), d_final)
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, n, dk, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)]
    return tuple(pl.pallas_call(
        functools.partial(_gpu_backward_kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=_gpu_in_specs(n, c, dk, bv, first=_per_token_block(n, c, bv, heads)),
        out_specs=[_whole(n, c, bv, split_v=True), _whole(n, dk, bv, split_v=True),
                   _whole(dk, bv, split_v=True)],
        out_shape=out_shape,
        compiler_params=compiler_params(
            "gpu", ("parallel", "parallel"),
            num_stages=_stages((w, q_decayed, k_decayed, intra), bv, 2)),
        cost_estimate=_cost(operands, out_shape),
        interpret=interpret,
    )(*operands))


def state_pass_tpu(u: jax.Array, w: jax.Array, q_decayed: jax.Array, k_decayed: jax.Array,
                   intra: jax.Array, chunk_decay: jax.Array, initial_state: jax.Array, *,
                   return_states: bool = False, interpret=False):
    """``state_pass`` for Mosaic TPU: grid (sequences, chunks), the state in a VMEM scratch.

    Same arguments and results as ``state_pass`` (no value blocks: the MXU wants the whole
    tile); ``interpret`` may be ``pltpu.InterpretParams(...)`` (race and out-of-bounds
    detection) or True.
    """
    from jax.experimental.pallas import tpu as pltpu

    r, n, c, dv = u.shape
    dk = w.shape[-1]
    final = (_per_seq(dk, dv), jax.ShapeDtypeStruct((r, dk, dv), jnp.float32))
    per_chunk = lambda rows: (chunk_block(rows, dv),
                              jax.ShapeDtypeStruct((r, n, rows, dv), u.dtype))
    if return_states:
        outs, factors = [final, per_chunk(dk), per_chunk(c)], (w, k_decayed)
        factor_specs = [chunk_block(c, dk)] * 2
    else:
        outs, factors = [per_chunk(c), final], (w, q_decayed, k_decayed, intra)
        factor_specs = [chunk_block(c, dk)] * 3 + [chunk_block(c, c)]
    out_specs, out_shape = (list(x) for x in zip(*outs))
    operands = (u, *factors, _decay_blocks(chunk_decay), initial_state)
    return tuple(pl.pallas_call(
        functools.partial(_tpu_kernel, save=return_states),
        grid=(r, n),
        in_specs=[chunk_block(c, dv), *factor_specs, chunk_block(1, 1), _per_seq(dk, dv)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=compiler_params("tpu", ("parallel", "arbitrary")),
        cost_estimate=_cost(operands, out_shape, save=return_states),
        interpret=interpret,
    )(*operands))


def state_pass_backward_tpu(d_out: jax.Array, w: jax.Array, q_decayed: jax.Array,
                            k_decayed: jax.Array, intra: jax.Array, chunk_decay: jax.Array,
                            d_final: jax.Array, *, interpret=False):
    """``state_pass_backward`` for Mosaic TPU: the chunk grid axis runs last chunk first (index
    maps N-1-j), the cotangent state in a VMEM scratch. Same arguments and results."""
    from jax.experimental.pallas import tpu as pltpu

    r, n, c, dv = d_out.shape
    dk = w.shape[-1]
    back = functools.partial(chunk_block, n_chunks=n)
    operands = (d_out, w, q_decayed, k_decayed, intra, _decay_blocks(chunk_decay), d_final)
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, n, dk, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)]
    return tuple(pl.pallas_call(
        _tpu_backward_kernel,
        grid=(r, n),
        in_specs=[back(c, dv), back(c, dk), back(c, dk), back(c, dk), back(c, c), back(1, 1),
                  _per_seq(dk, dv)],
        out_specs=[back(c, dv), back(dk, dv), _per_seq(dk, dv)],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=compiler_params("tpu", ("parallel", "arbitrary")),
        cost_estimate=_cost(operands, out_shape),
        interpret=interpret,
    )(*operands))
