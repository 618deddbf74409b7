"""The chunked gated delta rule with its pass across chunks in a Pallas kernel.

Forward: two Pallas kernels. ``hybrid_jax.kernels.gdn_chunk_factors`` computes everything local
to each chunk (the solve, w/u, the intra-chunk attention, with segment resets) on a parallel
grid; ``hybrid_jax.kernels.gdn_state_pass`` then carries the state across chunks on chip (its
Mosaic TPU variant on TPU, its GPU-style variant elsewhere).
Backward (``jax.custom_vjp``), recomputing rather than storing anything per chunk: the factors
again (forward factor kernel, which this time also writes each chunk's (I + A)^-1), the state
entering each chunk (forward state pass), the state's cotangent from the last chunk to the first
(backward state pass), the factors' cotangents from those (local to each chunk:
``gdn_step_cotangents``), and finally the factor kernel's VJP (``chunk_factors_backward_kernel``),
which recomputes the gates. The per-chunk arrays the backward passes between kernels (states,
their cotangents, (I + A)^-1) are stored in the matmul operand dtype, bf16 for bf16 inputs, as
flash-linear-attention stores them; every running state and sum is float32. On GPU the
kernels read q, k, v and the output's cotangent, and write the output, dq, dk and dv, where
they lie in the model's [B, T, H, D] layout (strided rows), as flash-linear-attention does;
Mosaic TPU takes [B*H, N, C, D] sequences of whole tiles, transposed around the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.kernels.common import BACKENDS
from hybrid_jax.kernels.gdn_chunk_factors import (
    chunk_factors_backward_kernel,
    chunk_factors_kernel,
)
from hybrid_jax.kernels.gdn_state_pass import (
    chunk_outputs,
    state_pass,
    state_pass_backward,
    state_pass_backward_tpu,
    state_pass_tpu,
)
from hybrid_jax.kernels.gdn_step_cotangents import step_cotangents
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


def _unsequences(x: jax.Array, b: int, t: int, h: int, d: int | None = None) -> jax.Array:
    """The inverse of ``_sequences``: [B*H, N, C, ...] -> [B, T, H, ...], padding dropped."""
    x = x.reshape(b, h, -1, *x.shape[3:])[:, :, :t]
    if d is not None:
        x = x[..., :d]
    return jnp.moveaxis(x, 1, 2)


def _tokens(x: jax.Array, chunk_size: int, pad_to: int) -> jax.Array:
    """[B, T, H, D] -> [B, N * C, H, pad_to]: T zero-padded to whole chunks and D to
    ``pad_to``, token-major as the GPU kernels read it (``common.sequence_block``); no copy
    when nothing needs padding (OLMo Hybrid's 96 and 192, T a multiple of 64)."""
    widths = ((0, 0), (0, -x.shape[1] % chunk_size), (0, 0), (0, pad_to - x.shape[-1]))
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _per_token(x: jax.Array, chunk_size: int, pad_to: int, heads: int | None) -> jax.Array:
    """A per-token [B, T, H, D] array (q, k, v, dO) as the kernels take it: token-major given
    ``heads`` (GPU), else [B*H, N, C, D] sequences (Mosaic TPU's whole tiles)."""
    if heads is None:
        return _sequences(x, chunk_size, pad_to)
    return _tokens(x, chunk_size, pad_to)


def _from_per_token(x: jax.Array, b: int, t: int, h: int, d: int,
                    heads: int | None) -> jax.Array:
    """The inverse of ``_per_token``: [B, T, H, d], padding dropped."""
    if heads is None:
        return _unsequences(x, b, t, h, d)
    return x[:, :t, :, :d]


def _gpu_key_dim(dk: int) -> int:
    """Dk padded for the GPU kernels, which split key columns into blocks of 64: as far as
    the last block's width is a power of two (Triton tiles must be), at least 16 (the
    smallest a tensor-core dot takes). 96 stays 96 (64 + 32), 72 -> 80, 112 -> 128; a Dk up to
    64 goes to a power of two."""
    if dk <= 64:
        return _pow2(dk)
    rest = dk % 64
    return dk - rest + (max(_pow2(rest), 16) if rest else 0)


def _padded_dims(dk: int, dv: int, variant: str) -> tuple[int, int]:
    """(pk, pv): the head dims the kernels work on. On GPU, key dims only as far as
    ``_gpu_key_dim`` says (the kernels hold keys, and the state's rows, as blocks of 64 and a
    narrower last one: OLMo Hybrid's 96 stays 96), and value dims to a multiple of 64, the
    width every GPU kernel splits them into (its 192 stays 192: a power of two, 256, would be
    a third more value work and state memory). On TPU both go to a power of two, whole tiles
    of 128 lanes. (Mosaic would take unpadded whole-dim blocks, and at one layer XLA counted a
    fifth fewer bytes, but TPU memory tiles the minor dim to 128 lanes anyway and the 7B train
    step at 65,536 tokens per v5p chip then needed 77.7 GiB instead of 70.4:
    experiments/RESULTS.md, 2026-12-04.) The zero padding is exact: padded key dimensions
    never enter the state, padded value dimensions are sliced off."""
    if variant == "gpu":
        return _gpu_key_dim(dk), (-(-dv // 64) * 64 if dv > 64 else _pow2(dv))
    return _pow2(dk), _pow2(dv)


def _heads(variant: str, h: int) -> int | None:
    """The kernels' ``heads`` argument: H on GPU, where they read and write [B, T, H, D]
    arrays token-major (at OLMo Hybrid's layer the transposes in and out, as traced, would
    move up to 0.57 GB in the forward besides the kernels' 0.83 GB); None on TPU (sequences,
    whole tiles)."""
    return h if variant == "gpu" else None


def _kernel_inputs(q, k, v, g, beta, reset, chunk_size: int, variant: str):
    """The factor kernels' inputs and the padded head dims: (q, k, v, g, beta, seg), q, k and v
    as ``_per_token`` lays them out (on GPU q and k keep their Hk heads, which the kernels
    read per group of value heads; on TPU they are repeated to H), g, beta and seg (the
    segment index inside each chunk, zeros without resets) as [B*H, N, C] sequences; pk, pv
    (``_padded_dims``)."""
    b, t, h = v.shape[:3]
    dk = q.shape[-1]
    heads = _heads(variant, h)
    if heads is None and q.shape[2] != h:
        q, k = (jnp.repeat(x, h // q.shape[2], axis=2) for x in (q, k))
    pk, pv = _padded_dims(dk, v.shape[-1], variant)
    n = -(-t // chunk_size)
    seg = chunk_segments(reset, chunk_size)  # [N, B, 1, C] or None
    if seg is None:
        seg = jnp.zeros((b * h, n, chunk_size), jnp.int32)
    else:
        seg = jnp.broadcast_to(jnp.moveaxis(seg, 0, 2), (b, h, n, chunk_size))
        seg = seg.reshape(b * h, n, chunk_size)
    inputs = (_per_token(q, chunk_size, pk, heads), _per_token(k, chunk_size, pk, heads),
              _per_token(v, chunk_size, pv, heads), _sequences(g, chunk_size),
              _sequences(beta, chunk_size), seg)
    return inputs, pk, pv


def _kernels(variant: str, r: int, dk: int, dv: int, heads: int | None):
    """(forward state pass, backward state pass) for the variant and R sequences of Dk key and
    Dv value columns (GPU: ``heads`` as the kernels take it). On GPU, value blocks of 64 unless
    that leaves under 64 programs (half the H100/H200's 132 SMs), or Dk is over 128, then 32.
    Measured on an H200: 64 best at 120 programs, 32 at 32 programs; OLMo Hybrid's layer at
    B = 1 (30 heads, 192 value columns) makes 90 programs of 64, each doing what each of the
    120 programs did with Dv padded to 256. The float32 [Dk, block_v] state takes
    Dk * block_v / 128 registers per thread: compiled for sm_90a, block_v 64 spilled at Dk 192
    (92 bytes in the forward pass) and 256 (356 and 320), 32 did not."""
    if variant == "tpu":
        return state_pass_tpu, state_pass_backward_tpu
    bv = 64 if r * dv // 64 >= 64 and dk <= 128 else 32
    return (functools.partial(state_pass, block_v=bv, heads=heads),
            functools.partial(state_pass_backward, block_v=bv, heads=heads))


# Where the GPU forward forms its output. "fused": inside the state pass, two of its four
# products per chunk (0.39 ms alone at OLMo Hybrid's layer on an H200, 90 programs). "parallel":
# the state pass writes the states and v_new (as it does for the backward) and
# ``chunk_outputs`` forms every chunk's output in parallel, as flash-linear-attention does: a
# shorter sequential pass for 0.47 GB more traffic at that layer (states and v_new written and
# read). Unmeasured on a GPU; ``experiments/bench_kernels_gpu.py --ablation`` times both.
GPU_FORWARD_OUTPUT = "fused"


def _pad_state(x: jax.Array, pk: int, pv: int) -> jax.Array:
    """[B, H, Dk, Dv] -> [B*H, pk, pv], zero-padded."""
    b, h, dk, dv = x.shape
    return jnp.pad(x.reshape(b * h, dk, dv), ((0, 0), (0, pk - dk), (0, pv - dv)))


def _unpad_state(x: jax.Array, like: jax.Array) -> jax.Array:
    """The inverse of ``_pad_state``, shaped and typed like ``like`` [B, H, Dk, Dv]."""
    b, h, dk, dv = like.shape
    return x[:, :dk, :dv].reshape(b, h, dk, dv).astype(like.dtype)


def _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, gpu_output, variant,
             interpret):
    b, t, h = v.shape[:3]
    heads = _heads(variant, h)
    inputs, pk, pv = _kernel_inputs(q, k, v, g, beta, reset, chunk_size, variant)
    f = chunk_factors_kernel(*inputs, scale=scale, backend=variant, heads=heads,
                             interpret=interpret)
    forward, _ = _kernels(variant, b * h, pk, pv, heads)
    s0 = _pad_state(initial_state, pk, pv)
    if variant == "gpu" and gpu_output == "parallel":
        final, states, v_new = forward(*f, s0, return_states=True, interpret=interpret)
        o = chunk_outputs(f[2], f[4], states, v_new, heads=heads, interpret=interpret)
    else:
        o, final = forward(*f, s0, interpret=interpret)
    return (_from_per_token(o, b, t, h, v.shape[-1], heads),
            _unpad_state(final, initial_state))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _gdn_pallas(q, k, v, g, beta, initial_state, reset, scale, chunk_size, gpu_output, variant,
                interpret):
    return _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, gpu_output,
                    variant, interpret)


def _fwd(q, k, v, g, beta, initial_state, reset, scale, chunk_size, gpu_output, variant,
         interpret):
    out = _forward(q, k, v, g, beta, initial_state, reset, scale, chunk_size, gpu_output,
                   variant, interpret)
    return out, (q, k, v, g, beta, initial_state, reset)


def _bwd(scale, chunk_size, gpu_output, variant, interpret, saved, cotangents):
    """Recompute, don't store: each chunk's factors (forward factor kernel), the state entering
    each chunk (forward state pass), then the state's cotangent from the last chunk to the first
    (backward state pass). The factors' cotangents given those states are local to each chunk
    (``step_cotangents``, one kernel), and the factor kernel's VJP, given the recompute's
    (I + A)^-1, takes them back to q, k, v, g and beta."""
    del gpu_output  # the forward's choice; this pass writes the states either way
    q, k, v, g, beta, initial_state, reset = saved
    d_out, d_final = cotangents
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    heads = _heads(variant, h)
    inputs, pk, pv = _kernel_inputs(q, k, v, g, beta, reset, chunk_size, variant)
    f = chunk_factors_kernel(*inputs, scale=scale, backend=variant, return_inverse=True,
                             heads=heads, interpret=interpret)
    f, inverse_t = f[:6], f[6:]  # the factors; T^T's pieces for their VJP
    forward, backward = _kernels(variant, b * h, pk, pv, heads)
    _, states, v_new = forward(*f, _pad_state(initial_state, pk, pv), return_states=True,
                               interpret=interpret)
    # Zero past T and past Dv.
    d_o = _per_token(d_out, chunk_size, pv, heads).astype(f[0].dtype)
    dv_new, grads, d_s0 = backward(d_o, *f[1:],
                                   _pad_state(d_final.astype(jnp.float32), pk, pv),
                                   interpret=interpret)
    d_factors = (dv_new, *step_cotangents(v_new, d_o, dv_new, states, grads,
                                          backend=variant, heads=heads, interpret=interpret))
    dq, dk_, dv_, dg, dbeta = chunk_factors_backward_kernel(
        *inputs, *d_factors, inverse_t, scale=scale, backend=variant, heads=heads,
        interpret=interpret)
    cast = lambda x, like: x.astype(like.dtype)
    per_token = lambda x, d, like: cast(_from_per_token(x, b, t, h, d, heads), like)

    def per_key_head(x, like):  # dq, dk are per value head: sum each key head's group
        if like.shape[2] == h:
            return per_token(x, dk, like)
        x = _from_per_token(x, b, t, h, dk, heads).astype(jnp.float32)
        return cast(jnp.sum(x.reshape(b, t, like.shape[2], -1, dk), axis=3), like)

    return (per_key_head(dq, q), per_key_head(dk_, k), per_token(dv_, dv, v),
            cast(_unsequences(dg, b, t, h), g),
            cast(_unsequences(dbeta, b, t, h), beta), _unpad_state(d_s0, initial_state), None)


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
    (shapes documented there; q and k may also have fewer heads than v, Hk dividing H, each
    serving a group of consecutive value heads: the GPU kernels read them unrepeated), plus
    ``variant``: "tpu" (Mosaic TPU kernel) or "gpu" (GPU-style kernel), and ``interpret``:
    run the kernels in Pallas interpret mode (True, or ``pltpu.InterpretParams`` for the TPU
    variant).

    Left None, both are chosen when the program is lowered, for the platform it is lowered for
    (``jax.lax.platform_dependent``): "tpu" compiled on TPU, "gpu" compiled on CUDA and ROCm,
    "gpu" interpreted elsewhere (CPU, where Pallas cannot compile). So a program traced on a
    CPU host and compiled ahead of time for a TPU topology runs the Mosaic kernels there."""
    if variant is not None and variant not in BACKENDS:
        raise ValueError(f"gdn_pallas: variant must be one of {BACKENDS}, got {variant!r}")
    args = (q, k, v, g, beta, initial_state, reset)
    # The output choice is a static argument, not read inside the trace: jax caches traces.
    static = (scale, chunk_size, GPU_FORWARD_OUTPUT)
    if variant is not None and interpret is not None:
        return _gdn_pallas(*args, *static, variant, interpret)

    def on(platform: str):
        chosen = (variant or ("tpu" if platform == "tpu" else "gpu"),
                  platform == "cpu" if interpret is None else interpret)
        return lambda *a: _gdn_pallas(*a, *static, *chosen)

    return jax.lax.platform_dependent(*args, tpu=on("tpu"), cuda=on("cuda"), rocm=on("rocm"),
                                      default=on("cpu"))
