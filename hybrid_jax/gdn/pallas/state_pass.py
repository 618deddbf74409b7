"""Pallas kernels (GPU, Triton lowering): the gated delta rule's pass across chunks, forward
and backward, with the state kept on chip.

The XLA ``chunk`` form scans over chunks with ``lax.scan``: every chunk's [Dk, Dv] state goes
back to memory between steps, each step several small XLA ops. Here one program owns one
(sequence, block of value columns) and loops over its chunks inside the kernel, reading each
chunk from the whole-sequence arrays in global memory, the state a loop carry in registers:
per chunk it reads the chunk's factors once and writes its output once. The rule is
independent across value columns, so splitting them keeps a [Dk, block_v] state in registers
and gives the card more programs. The per-chunk step and the results are ``state_step``'s.

Triton rather than Mosaic GPU: Mosaic GPU copies each block to shared memory whole, which a
whole sequence cannot fit, and its ``pallas_call`` path is deprecated in favour of
``plgpu.kernel``, whose structure (warp groups, explicit TMA pipelines) would be a separate
kernel.

Passes: ``state_pass_gpu`` (the output fused into the pass), ``entering_states_gpu`` (the
states and v_new, for the backward and for ``chunk_outputs``, which then forms every chunk's
output in parallel, as flash-linear-attention's forward does), ``state_pass_backward_gpu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.chunk_factors import ChunkFactors
from hybrid_jax.gdn.pallas.plan import KernelPlan, Layout, compiler_params
from hybrid_jax.gdn.pallas.state_step import (
    EnteringStates,
    PassCotangents,
    PassOutput,
    advance,
    chunk_output,
    decay_blocks,
    pass_cost,
    step_backward,
)
from hybrid_jax.gdn.pallas.tiles import (
    BLOCK_COLUMNS,
    batch_and_head,
    chunk_block,
    column_blocks,
    cost_estimate,
)


def _key_blocks(dk: int) -> list:
    """The state's row blocks of keys: 64 rows, the last one narrower (Dk 96 = 64 + 32)."""
    return column_blocks(dk, BLOCK_COLUMNS["gpu"])


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
        v_new, next_state = advance(u_ref[n], _columns(w_ref, n, keys),
                                     _columns(kd_ref, n, keys), decay_ref[n], state)
        o_ref[_rows_of_chunk(o_ref, n, c)] = chunk_output(
            _columns(qd_ref, n, keys), intra_ref[n], state, v_new).astype(o_ref.dtype)
        return next_state

    _store_rows(s_ref, keys, jax.lax.fori_loop(0, n_chunks, chunk, _load_rows(s0_ref, keys)))


def _gpu_states_kernel(u_ref, w_ref, kd_ref, decay_ref, s0_ref, s_ref, states_ref, v_new_ref,
                       *, n_chunks: int):
    """The forward pass again for the backward: the states and v_new, no output."""
    keys = _key_blocks(w_ref.shape[-1])

    def chunk(n, state):
        _store_rows(states_ref, keys, state, n)
        v_new, state = advance(u_ref[n], _columns(w_ref, n, keys), _columns(kd_ref, n, keys),
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
        dv_new, grad = step_backward(
            do_ref[_rows_of_chunk(do_ref, n, c)], _columns(w_ref, n, keys),
            _columns(qd_ref, n, keys),
            _columns(kd_ref, n, keys), intra_ref[n], decay_ref[n], grad)
        dv_ref[n] = dv_new.astype(dv_ref.dtype)
        return grad

    _store_rows(ds0_ref, keys,
                jax.lax.fori_loop(0, n_chunks, chunk, _load_rows(dfinal_ref, keys)))


def _gpu_output_kernel(qd_ref, intra_ref, states_ref, v_new_ref, o_ref):
    keys = _key_blocks(qd_ref.shape[-1])
    qd = tuple(qd_ref[:, cols] for cols in keys)
    o_ref[...] = chunk_output(qd, intra_ref[...], _load_rows(states_ref, keys),
                         v_new_ref[...]).astype(o_ref.dtype)


def _value_block(dv: int, plan: KernelPlan) -> int:
    bv = min(plan.block_v, dv)
    if dv % bv:
        raise ValueError(f"gdn state pass: Dv={dv} is not a multiple of block_v={bv}")
    return bv


def _whole(*shape, split_v=False):
    """Block: the whole per-sequence array, one sequence (and value block) per program."""
    last = (lambda j: (j,)) if split_v else (lambda j: (0,))
    return pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * (len(shape) - 1) + last(j))


def _per_token_block(n: int, c: int, bv: int, layout: Layout) -> pl.BlockSpec:
    """Block of a per-token array (the output or its cotangent): one sequence's whole
    [N, C, block_v], or token-major, its [N * C, block_v] rows, strided."""
    if not layout.token_major:
        return _whole(n, c, bv, split_v=True)

    def index(i, j):
        b, h = batch_and_head(i, layout.heads)
        return b, 0, h, j

    return pl.BlockSpec((None, n * c, None, bv), index)


def _in_specs(n: int, c: int, dk: int, bv: int, save: bool = False,
              first: pl.BlockSpec | None = None) -> list:
    """Every pass reads a [C, block_v] slice per chunk (u, or dO: ``first``, its block if not
    u's), the [C, Dk] / [C, C] factors whole (``save``: w and k_decayed only), the per-chunk
    decay, and a [Dk, block_v] state (initial or final)."""
    factors = [_whole(n, c, dk)] * (2 if save else 3) + ([] if save else [_whole(n, c, c)])
    return [first or _whole(n, c, bv, split_v=True), *factors, _whole(n, 1, 1),
            _whole(dk, bv, split_v=True)]


def _final_state(r: int, dk: int, dv: int, bv: int) -> tuple:
    return _whole(dk, bv, split_v=True), jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)


@functools.partial(jax.jit, static_argnames=("plan",))
def state_pass_gpu(factors: ChunkFactors, initial_state: jax.Array, *,
                   plan: KernelPlan) -> PassOutput:
    """Run the state across chunks, forming each chunk's output on the way.

    Args (one leading axis R for the independent (batch row, head) sequences):
      factors: ``ChunkFactors`` [R, N, ...] (``chunk_factors_kernel``): u [R, N, C, Dv]; w,
        q_decayed, k_decayed [R, N, C, Dk]; intra [R, N, C, C], all in one dtype (bf16 or
        float32), which the matmul operands take; chunk_decay [R, N] float32.
      initial_state: [R, Dk, Dv] float32.
      plan: grid (R, Dv / block_v); the output in the plan's per-token layout.
    Returns: ``PassOutput``: o in u's dtype, the final state float32.
    """
    u, w = factors.u, factors.w
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    bv = _value_block(dv, plan)
    out_shape = [jax.ShapeDtypeStruct(plan.layout.shape(r, n, c, dv), u.dtype),
                 jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)]
    operands = (u, w, factors.q_decayed, factors.k_decayed, factors.intra,
                decay_blocks(factors.chunk_decay), initial_state)
    return PassOutput(*pl.pallas_call(
        functools.partial(_gpu_kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=_in_specs(n, c, dk, bv),
        out_specs=[_per_token_block(n, c, bv, plan.layout), _whole(dk, bv, split_v=True)],
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel"),
                                        num_stages=plan.stages.forward),
        cost_estimate=pass_cost(operands, out_shape),
        interpret=plan.interpret,
    )(*operands))


@functools.partial(jax.jit, static_argnames=("plan",))
def entering_states_gpu(factors: ChunkFactors, initial_state: jax.Array, *,
                        plan: KernelPlan) -> EnteringStates:
    """The forward pass for the backward (and for ``chunk_outputs``): the state entering each
    chunk and v_new = u - w S, no output; q_decayed and intra go unread. Arguments as for
    ``state_pass_gpu``. The state is carried in float32; the stored copies are matmul
    operands (and sum(S * G'), as flash-linear-attention forms it from stored bf16 states),
    stored in the factors' dtype."""
    u, w = factors.u, factors.w
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    bv = _value_block(dv, plan)
    out_shape = [jax.ShapeDtypeStruct((r, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((r, n, dk, dv), u.dtype),
                 jax.ShapeDtypeStruct((r, n, c, dv), u.dtype)]
    operands = (u, w, factors.k_decayed, decay_blocks(factors.chunk_decay), initial_state)
    return EnteringStates(*pl.pallas_call(
        functools.partial(_gpu_states_kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=_in_specs(n, c, dk, bv, save=True),
        out_specs=[_whole(dk, bv, split_v=True), _whole(n, dk, bv, split_v=True),
                   _whole(n, c, bv, split_v=True)],
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel"),
                                        num_stages=plan.stages.states),
        cost_estimate=pass_cost(operands, out_shape, save=True),
        interpret=plan.interpret,
    )(*operands))


@functools.partial(jax.jit, static_argnames=("plan",))
def state_pass_backward_gpu(d_out: jax.Array, factors: ChunkFactors, d_final: jax.Array, *,
                            plan: KernelPlan) -> PassCotangents:
    """The state pass backwards, last chunk first.

    Args:
      d_out: the output's cotangent in the factors' dtype, in the plan's per-token layout (as
        ``state_pass_gpu`` writes the output); factors: as for ``state_pass_gpu`` (u unread);
      d_final: [R, Dk, Dv] float32, the final state's cotangent.
    Returns: ``PassCotangents``.
    """
    w = factors.w
    r, n, c, dk = w.shape
    dv = d_out.shape[-1]
    bv = _value_block(dv, plan)
    operands = (d_out, w, factors.q_decayed, factors.k_decayed, factors.intra,
                decay_blocks(factors.chunk_decay), d_final)
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, n, dk, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)]
    return PassCotangents(*pl.pallas_call(
        functools.partial(_gpu_backward_kernel, n_chunks=n),
        grid=(r, dv // bv),
        in_specs=_in_specs(n, c, dk, bv, first=_per_token_block(n, c, bv, plan.layout)),
        out_specs=[_whole(n, c, bv, split_v=True), _whole(n, dk, bv, split_v=True),
                   _whole(dk, bv, split_v=True)],
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel", "parallel"),
                                        num_stages=plan.stages.backward),
        cost_estimate=pass_cost(operands, out_shape),
        interpret=plan.interpret,
    )(*operands))


@functools.partial(jax.jit, static_argnames=("plan",))
def chunk_outputs(factors: ChunkFactors, entering: EnteringStates, *,
                  plan: KernelPlan) -> jax.Array:
    """Every chunk's output at once, from the states entering the chunks: the output half of
    ``state_pass_gpu``, for a forward that runs ``entering_states_gpu`` first (as
    flash-linear-attention's ``chunk_fwd_h`` then ``chunk_fwd_o``). The sequential pass then
    does two products per chunk instead of four, and these run on a (sequence, chunk, value
    block) grid of many programs, for writing and reading the states and v_new once more.

    Returns: o in the plan's per-token layout, in v_new's dtype, float32-accumulated.
    """
    q_decayed, v_new = factors.q_decayed, entering.v_new
    r, n, c, dk = q_decayed.shape
    dv = v_new.shape[-1]
    bv = _value_block(dv, plan)
    per_v = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda i, j, k: (i, j, 0, k))
    operands = (q_decayed, factors.intra, entering.states, v_new)
    out_shape = jax.ShapeDtypeStruct(plan.layout.shape(r, n, c, dv), v_new.dtype)

    def token_index(i, j, k):
        b, h = batch_and_head(i, plan.layout.heads)
        return b, j, h, k

    token_major = plan.layout.token_major
    out_spec = pl.BlockSpec((None, c, None, bv), token_index) if token_major else per_v(c)
    return pl.pallas_call(
        _gpu_output_kernel,
        grid=(r, n, dv // bv),
        in_specs=[chunk_block(c, dk), chunk_block(c, c), per_v(dk), per_v(c)],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(plan, ("parallel",) * 3),
        cost_estimate=cost_estimate(r * n * (dv // bv), 2 * c * (dk + c) * bv, 0, operands,
                                    [out_shape]),
        interpret=plan.interpret,
    )(*operands)
