"""Pallas kernels (Mosaic TPU): the gated delta rule's pass across chunks, forward and
backward, the state in VMEM.

The chunk axis is a sequential ("arbitrary") grid dimension (run last chunk first for the
backward), each grid step gets one chunk's blocks in VMEM, and the state lives in a VMEM
scratch that persists across the steps: whole sequences would not fit VMEM. The state is one
block (whole tiles for the MXU). The per-chunk step and the results are ``state_step``'s;
arguments and results are those of the GPU passes (``state_pass``), sequences only. Verified
in interpret mode (``pltpu.InterpretParams`` also detects races and out-of-bounds reads) and
compiled by Mosaic ahead of time (``hybrid_jax.aot.kernels``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.chunk_factors import ChunkFactors
from hybrid_jax.gdn.pallas.plan import KernelPlan, compiler_params
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
from hybrid_jax.gdn.pallas.tiles import chunk_block


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
    v_new, (next_state,) = advance(u_ref[...], (w_ref[...],), (kd_ref[...],), decay_ref[...],
                                    (state,))
    if save:
        states_ref[...] = state.astype(states_ref.dtype)
        v_new_ref[...] = v_new.astype(v_new_ref.dtype)
    else:
        o_ref[...] = chunk_output((qd_ref[...],), intra_ref[...], (state,),
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
    dv_new, (grad,) = step_backward(do_ref[...], (w_ref[...],), (qd_ref[...],),
                                           (kd_ref[...],), intra_ref[...], decay_ref[...],
                                           (grad_ref[...],))
    dv_ref[...] = dv_new.astype(dv_ref.dtype)
    grad_ref[...] = grad

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = grad


def _per_seq(*shape):
    """TPU block: one sequence's [Dk, Dv] state (the same block at every chunk)."""
    return pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))


def _forward_call(factors: ChunkFactors, initial_state: jax.Array, plan: KernelPlan,
                  save: bool) -> tuple:
    from jax.experimental.pallas import tpu as pltpu

    u, w = factors.u, factors.w
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    final = (_per_seq(dk, dv), jax.ShapeDtypeStruct((r, dk, dv), jnp.float32))
    per_chunk = lambda rows: (chunk_block(rows, dv),
                              jax.ShapeDtypeStruct((r, n, rows, dv), u.dtype))
    if save:
        outs, read = [final, per_chunk(dk), per_chunk(c)], (w, factors.k_decayed)
        read_specs = [chunk_block(c, dk)] * 2
    else:
        outs = [per_chunk(c), final]
        read = (w, factors.q_decayed, factors.k_decayed, factors.intra)
        read_specs = [chunk_block(c, dk)] * 3 + [chunk_block(c, c)]
    out_specs, out_shape = (list(x) for x in zip(*outs))
    operands = (u, *read, decay_blocks(factors.chunk_decay), initial_state)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, save=save),
        grid=(r, n),
        in_specs=[chunk_block(c, dv), *read_specs, chunk_block(1, 1), _per_seq(dk, dv)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=compiler_params(plan, ("parallel", "arbitrary")),
        cost_estimate=pass_cost(operands, out_shape, save=save),
        interpret=plan.interpret,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("plan",))
def state_pass_tpu(factors: ChunkFactors, initial_state: jax.Array, *,
                   plan: KernelPlan) -> PassOutput:
    """``state_pass_gpu`` for Mosaic TPU: grid (sequences, chunks)."""
    return PassOutput(*_forward_call(factors, initial_state, plan, save=False))


@functools.partial(jax.jit, static_argnames=("plan",))
def entering_states_tpu(factors: ChunkFactors, initial_state: jax.Array, *,
                        plan: KernelPlan) -> EnteringStates:
    """``entering_states_gpu`` for Mosaic TPU."""
    return EnteringStates(*_forward_call(factors, initial_state, plan, save=True))


@functools.partial(jax.jit, static_argnames=("plan",))
def state_pass_backward_tpu(d_out: jax.Array, factors: ChunkFactors, d_final: jax.Array, *,
                            plan: KernelPlan) -> PassCotangents:
    """``state_pass_backward_gpu`` for Mosaic TPU: the chunk grid axis runs last chunk first
    (index maps N-1-j), the cotangent state in a VMEM scratch."""
    from jax.experimental.pallas import tpu as pltpu

    w = factors.w
    r, n, c, dv = d_out.shape
    dk = w.shape[-1]
    back = functools.partial(chunk_block, n_chunks=n)
    operands = (d_out, w, factors.q_decayed, factors.k_decayed, factors.intra,
                decay_blocks(factors.chunk_decay), d_final)
    out_shape = [jax.ShapeDtypeStruct((r, n, c, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, n, dk, dv), w.dtype),
                 jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)]
    return PassCotangents(*pl.pallas_call(
        _tpu_backward_kernel,
        grid=(r, n),
        in_specs=[back(c, dv), back(c, dk), back(c, dk), back(c, dk), back(c, c), back(1, 1),
                  _per_seq(dk, dv)],
        out_specs=[back(c, dv), back(dk, dv), _per_seq(dk, dv)],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=compiler_params(plan, ("parallel", "arbitrary")),
        cost_estimate=pass_cost(operands, out_shape),
        interpret=plan.interpret,
    )(*operands))
