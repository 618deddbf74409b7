"""The chunked gated delta rule with its pass across chunks in a Pallas kernel.

Forward: each chunk's factors by XLA (``chunk_factors``, all chunks at once), then the state
pass by ``hybrid_jax.kernels.gdn_state_pass`` (the state stays on chip across chunks): its
Mosaic TPU variant on TPU, its GPU-style variant elsewhere.
Backward (``jax.custom_vjp``): recomputes through the XLA ``chunk`` form and differentiates it,
so nothing per chunk is stored; a backward kernel is still to come.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.kernels.gdn_state_pass import state_pass, state_pass_tpu
from hybrid_jax.ops.gdn_chunk import gdn_chunk
from hybrid_jax.ops.gdn_common import chunk_factors, chunk_segments, from_chunks, to_chunks


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant, interpret):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    xs = tuple(to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [N, B, H, C, ...]
    f = chunk_factors(*xs, chunk_segments(reset, chunk_size), scale)
    n = f.u.shape[0]
    # Triton blocks want power-of-two sizes: zero-pad the head dims (exact: padded key
    # dimensions never enter the state, padded value dimensions are sliced off).
    pk, pv = _pow2(dk) - dk, _pow2(dv) - dv

    def seqs(x, pad):
        """[N, B, H, C, D] -> [B*H, N, C, D + pad]."""
        x = jnp.moveaxis(x, 0, 2).reshape(b * h, n, *x.shape[3:])
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])

    kernel = state_pass_tpu if variant == "tpu" else state_pass
    o, final = kernel(
        seqs(f.u, pv), seqs(f.w, pk), seqs(f.q_decayed, pk), seqs(f.k_decayed, pk),
        seqs(f.intra, 0), jnp.moveaxis(f.chunk_decay, 0, 2).reshape(b * h, n),
        jnp.pad(initial_state.reshape(b * h, dk, dv), ((0, 0), (0, pk), (0, pv))),
        interpret=interpret)
    o = jnp.moveaxis(o[..., :dv].reshape(b, h, n, chunk_size, dv), 2, 0)  # [N, B, H, C, Dv]
    return from_chunks(o, t), final[:, :dk, :dv].reshape(b, h, dk, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _gdn_pallas(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant, interpret):
    return _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant,
                    interpret)


def _fwd(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant, interpret):
    out = _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant,
                   interpret)
    return out, (q, k, v, g, beta, initial_state, reset)


def _bwd(scale, chunk_size, variant, interpret, saved, cotangents):
    q, k, v, g, beta, initial_state, reset = saved
    _, vjp = jax.vjp(
        lambda q, k, v, g, beta, s0: gdn_chunk(q, k, v, g, beta, scale, s0, reset, chunk_size),
        q, k, v, g, beta, initial_state)
    return (*vjp(cotangents), None)


_gdn_pallas.defvjp(_fwd, _bwd)


def gdn_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int = 64,
    variant: str | None = None,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked form with the Pallas state pass: the arguments and results of ``gdn_chunk``
    (shapes documented there), plus ``variant``: "tpu" (Mosaic TPU kernel) or "gpu"
    (GPU-style kernel); None picks "tpu" on TPU and "gpu" elsewhere; and ``interpret``: run
    the kernel in Pallas interpret mode (True, or ``pltpu.InterpretParams`` for the TPU
    variant); None means on CPU only, where Pallas cannot compile."""
    if variant is None:
        variant = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if variant not in ("gpu", "tpu"):
        raise ValueError(f"gdn_pallas: variant must be 'gpu' or 'tpu', got {variant!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _gdn_pallas(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant,
                       interpret)
