"""The chunked gated delta rule with its pass across chunks in a Pallas kernel.

Forward: two Pallas kernels. ``hybrid_jax.kernels.gdn_chunk_factors`` computes everything local
to each chunk (the solve, w/u, the intra-chunk attention, with segment resets) on a parallel
grid; ``hybrid_jax.kernels.gdn_state_pass`` then carries the state across chunks on chip (its
Mosaic TPU variant on TPU, its GPU-style variant elsewhere).
Backward (``jax.custom_vjp``): recomputes through the XLA ``chunk`` form and differentiates it,
so nothing per chunk is stored; a backward kernel is still to come.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.kernels.gdn_chunk_factors import chunk_factors_kernel
from hybrid_jax.kernels.gdn_state_pass import state_pass, state_pass_tpu
from hybrid_jax.ops.gdn_chunk import gdn_chunk
from hybrid_jax.ops.gdn_common import chunk_segments


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _sequences(x: jax.Array, chunk_size: int, pad_to: int | None = None) -> jax.Array:
    """[B, T, H, ...] -> [B*H, N, C, ...]: one row per (batch row, head), T zero-padded to whole
    chunks (inert: g = beta = k = 0 leave the state alone) and, given ``pad_to``, the last axis
    zero-padded to that size."""
    b, t, h = x.shape[:3]
    widths = [(0, 0), (0, -t % chunk_size)] + [(0, 0)] * (x.ndim - 2)
    if pad_to is not None:
        widths[-1] = (0, pad_to - x.shape[-1])
    x = jnp.pad(x, widths)
    x = x.reshape(b, -1, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1).reshape(b * h, -1, chunk_size, *x.shape[4:])


def _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, variant, interpret):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    # Kernel blocks want power-of-two head dims (Triton requires them): zero-pad (exact:
    # padded key dimensions never enter the state, padded value dimensions are sliced off).
    pk, pv = _pow2(dk), _pow2(dv)
    n = -(-t // chunk_size)
    seg = chunk_segments(reset, chunk_size)  # [N, B, 1, C] segment index inside each chunk
    if seg is None:
        seg = jnp.zeros((b * h, n, chunk_size), jnp.int32)
    else:
        seg = jnp.broadcast_to(jnp.moveaxis(seg, 0, 2), (b, h, n, chunk_size))
        seg = seg.reshape(b * h, n, chunk_size)
    f = chunk_factors_kernel(
        _sequences(q, chunk_size, pk), _sequences(k, chunk_size, pk),
        _sequences(v, chunk_size, pv), _sequences(g, chunk_size),
        _sequences(beta, chunk_size), seg, scale=scale, backend=variant, interpret=interpret)
    kernel = state_pass_tpu if variant == "tpu" else state_pass
    s0 = jnp.pad(initial_state.reshape(b * h, dk, dv), ((0, 0), (0, pk - dk), (0, pv - dv)))
    o, final = kernel(*f, s0, interpret=interpret)  # [B*H, N, C, pv], [B*H, pk, pv]
    o = jnp.moveaxis(o[..., :dv].reshape(b, h, -1, dv), 1, 2)[:, :t]
    return o, final[:, :dk, :dv].reshape(b, h, dk, dv)


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
    out, vjp = jax.vjp(
        lambda q, k, v, g, beta, s0: gdn_chunk(q, k, v, g, beta, scale, s0, reset, chunk_size),
        q, k, v, g, beta, initial_state)
    # The kernel's o is in the matmul dtype (bf16 for bf16 inputs); chunk's may differ.
    cotangents = jax.tree.map(lambda c, o: c.astype(o.dtype), cotangents, out)
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
