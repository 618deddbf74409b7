"""Pallas kernel: the chunked gated delta rule's pass across chunks, state kept on chip.

The XLA ``chunk`` form (``hybrid_jax.ops.gdn_chunk``) scans over chunks with ``lax.scan``: every
chunk's [Dk, Dv] state goes back to memory between steps, and each step is several small XLA
ops. Here one kernel program owns one (batch row, head) and loops over its chunks with the state
in a loop carry (registers / on-chip memory), so per chunk it reads the chunk's factors once
and writes its output once:

    v_new = u - w S;   o = q_decayed S + intra v_new;   S = chunk_decay * S + k_decayed^T v_new

The per-chunk factors (the WY/UT solve, u, w, the intra-chunk attention, with segment resets)
come from ``hybrid_jax.ops.gdn_common.chunk_factors``, computed for all chunks at once by XLA.
Its slow, obviously-right twin is ``hybrid_jax.ops.gdn_chunk``'s scan step (``_state_step``).

Structure: written GPU-style (the loop over chunks inside the kernel, one program per row and
head, whole-array blocks indexed per chunk), which the Triton-lowering Pallas backend and
interpret mode both take. Head dims are padded to powers of two by the caller, as Triton blocks
must be. Verified in interpret mode only (no accelerator was available when it was written);
a TPU variant wants the chunk axis as a sequential grid dimension with the state in a VMEM
scratch instead, since whole-sequence blocks do not fit VMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def _kernel(u_ref, w_ref, qd_ref, kd_ref, intra_ref, decay_ref, s0_ref, o_ref, s_ref, *,
            n_chunks: int):
    def chunk(n, state):
        v_new = u_ref[n] - _mm(w_ref[n], state)  # [C, Dv]
        o_ref[n] = _mm(qd_ref[n], state) + _mm(intra_ref[n], v_new)
        return decay_ref[n] * state + _mm(kd_ref[n].T, v_new)

    s_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[...])


@functools.partial(jax.jit, static_argnames=("interpret",))
def state_pass(u: jax.Array, w: jax.Array, q_decayed: jax.Array, k_decayed: jax.Array,
               intra: jax.Array, chunk_decay: jax.Array, initial_state: jax.Array, *,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Run the state across chunks.

    Args (all float32, one leading axis R for the independent (row, head) sequences):
      u: [R, N, C, Dv]; w, q_decayed, k_decayed: [R, N, C, Dk]; intra: [R, N, C, C];
      chunk_decay: [R, N]; initial_state: [R, Dk, Dv].
      interpret: run the kernel body as ordinary JAX ops (CPU tests).
    Returns:
      (o [R, N, C, Dv], final state [R, Dk, Dv]), float32.
    """
    r, n, c, dv = u.shape
    dk = w.shape[-1]
    decay = chunk_decay.astype(jnp.float32)[:, :, None, None]  # [R, N, 1, 1]: one block per chunk

    def whole(*shape):
        """The whole per-sequence array, one sequence per program."""
        return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))

    return pl.pallas_call(
        functools.partial(_kernel, n_chunks=n),
        grid=(r,),
        in_specs=[whole(n, c, dv), whole(n, c, dk), whole(n, c, dk), whole(n, c, dk),
                  whole(n, c, c), whole(n, 1, 1), whole(dk, dv)],
        out_specs=[whole(n, c, dv), whole(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((r, n, c, dv), jnp.float32),
                   jax.ShapeDtypeStruct((r, dk, dv), jnp.float32)],
        interpret=interpret,
    )(u, w, q_decayed, k_decayed, intra, decay, initial_state)
