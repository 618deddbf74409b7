"""The pass across chunks, one chunk at a time, inside a kernel: what the GPU
(``state_pass``) and Mosaic TPU (``state_pass_tpu``) passes share, and their results.

Forward, with S the state entering a chunk (float32), per chunk:

    v_new = u - w S;   o = q_decayed S + intra v_new;   S' = chunk_decay * S + k_decayed^T v_new

Backward, last chunk first, with G' = dL/dS' (from the final state's cotangent) and dO the
output's cotangent:

    dv_new = intra^T dO + k_decayed G';   G = chunk_decay * G' + q_decayed^T dO - w^T dv_new

Everything else in the gradient is local to a chunk given S, G' and dv_new
(``step_cotangents``). The twin is ``hybrid_jax.gdn.chunk.chunk_state_step`` and its
autodiff. The state may be split into row blocks of keys (GPU: [64, block_v] tiles, the last
one narrower, as Triton tiles must be powers of two); the sums are float32, the matmul
operands in the factors' dtype (bf16 for bf16 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.gdn.pallas.tiles import cost_estimate, mm


class PassOutput(NamedTuple):
    """The forward pass: o (per-token layout, the factors' dtype), final [R, Dk, Dv] float32."""

    o: jax.Array
    final: jax.Array


class EnteringStates(NamedTuple):
    """The forward pass for the backward: the final state [R, Dk, Dv] float32, the state
    entering each chunk [R, N, Dk, Dv] and each chunk's v_new = u - w S [R, N, C, Dv], both
    in the factors' dtype (the backward's matmul operands: bf16 halves their memory)."""

    final: jax.Array
    states: jax.Array
    v_new: jax.Array


class PassCotangents(NamedTuple):
    """The backward pass: dv_new [R, N, C, Dv] and grads [R, N, Dk, Dv] (G', the cotangent
    of the state leaving each chunk), in the factors' dtype, summed in float32; d_initial
    [R, Dk, Dv] float32."""

    dv_new: jax.Array
    grads: jax.Array
    d_initial: jax.Array


def advance(u, w, kd, decay, state):
    """One chunk: (v_new [C, Dv], next state) from its factors and the state entering it, w and
    k_decayed as tuples of [C, block] column blocks and the state as the matching tuple of
    [block, Dv] row blocks. The state and all sums are float32; matmul operands take the
    factors' dtype (bf16 for bf16 inputs: tensor cores)."""
    dt = u.dtype
    v_new = u.astype(jnp.float32)  # [C, Dv]
    for w_b, s_b in zip(w, state):
        v_new = v_new - mm(w_b, s_b, dt)
    return v_new, tuple(decay * s_b + mm(kd_b.T, v_new, dt) for kd_b, s_b in zip(kd, state))


def chunk_output(qd, intra, state, v_new):
    """One chunk's output o [C, Dv] (float32) from the state entering it (key blocks, with
    q_decayed's matching column blocks) and its v_new."""
    dt = intra.dtype
    out = mm(intra, v_new, dt)
    for qd_b, s_b in zip(qd, state):
        out = out + mm(qd_b, s_b, dt)
    return out


def step_backward(do, w, qd, kd, intra, decay, grad):
    """One chunk backwards: (dv_new [C, Dv], G) from the output's cotangent dO, the factors and
    G' = dL/d(state leaving the chunk), key blocks as in ``advance``. Float32 sums, operands
    in intra's dtype."""
    dt = intra.dtype
    dv_new = mm(intra.T, do, dt)
    for kd_b, g_b in zip(kd, grad):
        dv_new = dv_new + mm(kd_b, g_b, dt)
    return dv_new, tuple(decay * g_b + mm(qd_b.T, do, dt) - mm(w_b.T, dv_new, dt)
                         for w_b, qd_b, g_b in zip(w, qd, grad))


def decay_blocks(chunk_decay: jax.Array) -> jax.Array:
    """[R, N] -> [R, N, 1, 1] float32: one block per chunk."""
    return chunk_decay.astype(jnp.float32)[:, :, None, None]


def pass_cost(operands, out_shape, save: bool = False) -> pl.CostEstimate:
    """Per chunk, either way: three [C, Dk, Dv] products (w S, q S, k^T v; backwards k G,
    q^T dO, w^T dv) and one [C, C, Dv] (intra v; backwards intra^T dO); ``save`` (no output):
    two [C, Dk, Dv] (w S, k^T v). Operands: (u or dO, w, ..., the initial or final state)."""
    r, n, c, dk = operands[1].shape
    dv = operands[-1].shape[-1]
    flops = 2 * 2 * c * dk * dv if save else 3 * 2 * c * dk * dv + 2 * c * c * dv
    return cost_estimate(r * n, flops, 0, operands, out_shape)
