"""Pallas kernels (interpret mode on CPU) against their XLA twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from hybrid_jax.gdn import ChunkFactors, chunk_factors, chunk_state_step
from hybrid_jax.gdn.pallas import KernelInputs, gdn_pallas, padded_head_dims, plan_kernels
from hybrid_jax.gdn.pallas.state_pass import (
    chunk_outputs,
    entering_states_gpu,
    state_pass_backward_gpu,
    state_pass_gpu,
)
from hybrid_jax.gdn.pallas.state_pass_tpu import (
    entering_states_tpu,
    state_pass_backward_tpu,
    state_pass_tpu,
)

# Mosaic TPU semantics in the interpreter, with race and out-of-bounds detection.
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True)


def _plan(backend: str, r: int, dk: int, dv: int, dtype=jnp.float32, c: int = 16,
          block_v: int | None = None):
    """A plan driving one kernel directly on [R, N, C, ...] sequences, interpreted."""
    return plan_kernels(batch=r, heads=1, key_dim=dk, value_dim=dv, dtype=dtype, chunk_size=c,
                        backend=backend, token_major=False, block_v=block_v,
                        interpret=True if backend == "gpu" else TPU_INTERPRET)


def _states_then_outputs(factors, s0, plan):
    """The GPU forward with its output from the parallel kernel: (o, final)."""
    entering = entering_states_gpu(factors, s0, plan=plan)
    return chunk_outputs(factors, entering, plan=plan), entering.final


VARIANTS = {
    "gpu": ("gpu", 64, lambda f, s0, plan: state_pass_gpu(f, s0, plan=plan)),
    "gpu, parallel output": ("gpu", 16, _states_then_outputs),
    "tpu": ("tpu", None, lambda f, s0, plan: state_pass_tpu(f, s0, plan=plan)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dk,dv", [(16, 32), (96, 64)])
def test_state_pass_kernel_matches_the_scan_step(dk, dv, variant):
    """Random factors, a chunk with a reset (decay 0) among them: the kernel's outputs and final
    state equal ``gdn_chunk``'s lax.scan over ``chunk_state_step``. Dk = 96: the GPU kernel holds
    the state as key blocks of 64 and 32 rows."""
    rng = np.random.default_rng(0)
    r, n, c = 3, 5, 16
    f = lambda *s, std=0.3: jnp.asarray(rng.standard_normal(s) * std, jnp.float32)
    u, intra = f(r, n, c, dv), f(r, n, c, c)
    # Key-side factors scaled as 1 / sqrt(Dk): the state stays bounded from chunk to chunk (at
    # 0.3 and Dk = 96 it grows ~3x a chunk, and float32 rounding with it).
    w, qd, kd = (f(r, n, c, dk, std=1.2 / dk ** 0.5) for _ in range(3))
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (r, n)), jnp.float32).at[1, 2].set(0.0)
    s0 = f(r, dk, dv)
    backend, block_v, run = VARIANTS[variant]
    o, final = run(ChunkFactors(u, w, qd, kd, intra, decay), s0,
                   _plan(backend, r, dk, dv, block_v=block_v))

    # The twin: chunk-major, [N, B=r, H=1, ...].
    factors = ChunkFactors(*(jnp.moveaxis(x, 1, 0)[:, :, None] for x in (u, w, qd, kd, intra)),
                           chunk_decay=jnp.moveaxis(decay, 1, 0)[:, :, None])
    want_final, want_o = jax.lax.scan(chunk_state_step, s0[:, None], factors)
    np.testing.assert_allclose(np.asarray(o), np.asarray(jnp.moveaxis(want_o[:, :, 0], 0, 1)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), np.asarray(want_final[:, 0]),
                               rtol=1e-5, atol=1e-5)


BACKWARD = {"gpu": (entering_states_gpu, state_pass_backward_gpu),
            "tpu": (entering_states_tpu, state_pass_backward_tpu)}


def _both_passes(variant, factors, s0, d_out, d_final, plan):
    """(EnteringStates, PassCotangents) of the variant's forward-for-backward and backward."""
    entering, backward = BACKWARD[variant]
    return (entering(factors, s0, plan=plan),
            backward(d_out, factors, d_final, plan=plan))


@pytest.mark.parametrize("variant,block_v,dk", [("gpu", 16, 16), ("gpu", 64, 96),
                                                ("tpu", None, 16)])
def test_state_pass_backward_matches_autodiff_of_the_scan(variant, block_v, dk):
    """The backward kernel's cotangents against jax.vjp of the scan over ``chunk_state_step``:
    d u (= dv_new), d initial state, and d chunk_decay (= sum(S * G') from the kernel's states and
    cotangent states); the forward pass's states and v_new for the backward; a chunk with
    decay 0 (a reset) among them; value blocks of 16 split the 32 value columns in two; Dk = 96
    splits the GPU kernels' states in key blocks of 64 and 32 rows."""
    rng = np.random.default_rng(4)
    r, n, c, dv = 2, 5, 16, 32
    f = lambda *s, std=0.3: jnp.asarray(rng.standard_normal(s) * std, jnp.float32)
    u, intra = f(r, n, c, dv), f(r, n, c, c)
    w, qd, kd = (f(r, n, c, dk, std=1.2 / dk ** 0.5) for _ in range(3))  # as above
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (r, n)), jnp.float32).at[1, 2].set(0.0)
    s0, d_out, d_final = f(r, dk, dv), f(r, n, c, dv), f(r, dk, dv)
    plan = _plan(variant, r, dk, dv, block_v=block_v)
    (final, states, v_new), (dv_new, grads, d_s0) = _both_passes(
        variant, ChunkFactors(u, w, qd, kd, intra, decay), s0, d_out, d_final, plan)

    def scan(u, decay, s0):
        factors = ChunkFactors(*(jnp.moveaxis(x, 1, 0)[:, :, None] for x in (u, w, qd, kd, intra)),
                               chunk_decay=jnp.moveaxis(decay, 1, 0)[:, :, None])
        final, o = jax.lax.scan(chunk_state_step, s0[:, None], factors)
        return jnp.moveaxis(o[:, :, 0], 0, 1), final[:, 0]

    (_, want_final), vjp = jax.vjp(scan, u, decay, s0)
    want_du, want_ddecay, want_ds0 = vjp((d_out, d_final))
    close = lambda a, b_: np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5,
                                                     atol=1e-5)
    close(final, want_final)
    close(states[:, 0], s0)
    close(dv_new, want_du)
    close(d_s0, want_ds0)
    close(jnp.sum(states * grads, axis=(-2, -1)), want_ddecay)
    close(grads[:, -1], d_final)
    close(v_new, u - jnp.einsum("rnck,rnkv->rncv", w, states, precision="highest"))


@pytest.mark.parametrize("variant,dk,dv", [("gpu", 96, 160), ("tpu", 16, 32)])
def test_step_cotangents_kernel_matches_autodiff_of_the_step(variant, dk, dv):
    """The factors' cotangents given the states (one kernel) against jax.vjp of ``gdn_chunk``'s
    chunk step at those states, for random output and next-state cotangents: d_w, d_q_decayed,
    d_k_decayed, d_intra, d_chunk_decay (d_u, = dv_new, is the kernel's input). On GPU, 96 key
    columns make two programs' blocks (64 and 32) and 160 value columns three blocks, the last
    narrower."""
    from hybrid_jax.gdn.pallas.state_step import EnteringStates, PassCotangents
    from hybrid_jax.gdn.pallas.step_cotangents import step_cotangents

    rng = np.random.default_rng(8)
    r, n, c = 2, 3, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
    factors = ChunkFactors(u=f(r, n, c, dv), w=f(r, n, c, dk), q_decayed=f(r, n, c, dk),
                           k_decayed=f(r, n, c, dk), intra=f(r, n, c, c),
                           chunk_decay=jnp.asarray(rng.uniform(0, 1, (r, n)), jnp.float32))
    states, d_out, grads = f(r, n, dk, dv), f(r, n, c, dv), f(r, n, dk, dv)
    # The step's batch axes [B, H] are this test's [R, N]: every chunk at its own state.
    _, vjp = jax.vjp(lambda fs: chunk_state_step(states, fs), factors)
    (want,) = vjp((grads, d_out))
    # The corrected values the forward state pass hands over: u - w S, here in float64.
    v_new = np.asarray(factors.u, np.float64) - np.einsum(
        "rnck,rnkv->rncv", np.asarray(factors.w, np.float64), np.asarray(states, np.float64))
    entering = EnteringStates(final=None, states=states, v_new=jnp.asarray(v_new, jnp.float32))
    got = step_cotangents(entering, d_out, PassCotangents(want.u, grads, None),
                          plan=_plan(variant, r, dk, dv))
    for a, b_, name in zip(got[1:], want[1:], ChunkFactors._fields[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_head_dims_are_padded_as_each_backends_tiles_need():
    """GPU: keys in blocks of 64 with a last block a power of two of at least 16 (up to 64,
    a power of two), values to a multiple of 64; TPU: powers of two."""
    keys = [padded_head_dims(d, 192, "gpu")[0] for d in (8, 24, 64, 72, 96, 112, 128, 200)]
    assert keys == [8, 32, 64, 80, 96, 128, 128, 208]
    assert [padded_head_dims(96, d, "gpu")[1] for d in (48, 64, 160, 192)] == [64, 64, 192, 192]
    assert padded_head_dims(96, 192, "tpu") == (128, 256)


def test_gpu_value_blocks_keep_the_state_in_registers_and_the_card_busy():
    """Value blocks of 64 at OLMo's layer (30 heads of 192: 90 programs), 32 where 64 would
    leave under 64 programs or where a [Dk, 64] float32 state spilled (Dk over 128, ptxas)."""
    block_v = lambda b, dk, dv: plan_kernels(batch=b, heads=1, key_dim=dk, value_dim=dv,
                                             dtype=jnp.bfloat16).block_v
    assert [block_v(30, 96, 192), block_v(2, 96, 192), block_v(64, 128, 128),
            block_v(64, 192, 192), block_v(64, 256, 256)] == [64, 32, 64, 32, 32]


@pytest.mark.parametrize("variant,dk,dv,output,hk", [
    ("gpu", 24, 48, "fused", 2), ("gpu", 24, 48, "parallel", 1), ("tpu", 24, 48, "fused", 1),
    ("gpu", 96, 192, "fused", 2)])
def test_gdn_pallas_matches_chunk_with_padded_head_dims_and_resets(variant, dk, dv, output, hk):
    """The whole op: OLMo's head-dim ratio, padded (24 -> 32, 48 -> 64; on TPU to powers of
    two, on GPU OLMo's own 96 and 192 unpadded), a partial last chunk, segment resets and an
    initial state; outputs, final state and gradients; on GPU with the forward's output
    formed in the state pass or by its own parallel kernel; with hk = 1, one key head for
    both value heads (q and k unrepeated: the GPU kernels read them per group, TPU repeats
    them), against ``gdn_chunk`` on repeated ones."""
    from hybrid_jax.gdn import gdn_chunk

    rng = np.random.default_rng(1)
    b, t, h = 2, 45, 2
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = x(b, t, hk, dk), x(b, t, hk, dk), x(b, t, h, dv)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jnp.abs(x(b, t, h)) * 0.5
    beta = jnp.asarray(rng.uniform(0, 2, (b, t, h)), jnp.float32)
    s0 = x(b, h, dk, dv) * 0.1
    reset = jnp.zeros((b, t), bool).at[0, 20].set(True).at[1, 3].set(True)
    interpret = True if variant == "gpu" else TPU_INTERPRET

    def loss(fn, **kw):
        def f(q, k, v, g, beta, s0):
            o, final = fn(q, k, v, g, beta, dk ** -0.5, s0, reset, 16, **kw)
            return jnp.sum(o ** 2) + jnp.sum(final * s0), (o, final)
        return jax.value_and_grad(f, argnums=range(6), has_aux=True)(q, k, v, g, beta, s0)

    (_, got), got_grads = loss(gdn_pallas, backend=variant, interpret=interpret,
                               forward_output=output)
    repeat = lambda x: jnp.repeat(x, h // hk, axis=2)
    (_, want), want_grads = loss(lambda q, k, *a: gdn_chunk(repeat(q), repeat(k), *a))
    for a, b_ in zip((*got, *got_grads), (*want, *want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=2e-5, atol=2e-5)


def _hard_chunks(rng: np.random.Generator, c: int, r: int = 2, n: int = 4, dk: int = 8,
                 dv: int = 16):
    """Chunked inputs [R, N, C, ...] for the factor kernels, float32: decays from none (g = 0)
    to very strong (chunk by chunk), beta up to 2, unit keys, random resets inside chunks, one
    at chunk 3's first position, and none in row 0's first three chunks (so their chunk_decay
    is not zero). Returns q, k, v, g, beta and the segment index seg [R, N, C]."""
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = x(r, n, c, dk), x(r, n, c, dk), x(r, n, c, dv)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jnp.abs(x(r, n, c)) * jnp.asarray([0.0, 0.1, 3.0, 30.0])[None, :, None]
    beta = jnp.asarray(rng.uniform(0, 2, (r, n, c)), jnp.float32)
    reset = (rng.uniform(size=(r, n, c)) < 0.15) | (np.arange(c) == 0)[None, None] * (
        np.arange(n) == 3)[None, :, None]
    reset[0, :3] = False
    return q, k, v, g, beta, jnp.asarray(np.cumsum(reset, axis=-1), jnp.int32)


def test_split_matmuls_against_float64():
    """The kernels' bf16-unit matmuls: ``mm_split`` keeps about 16 significant bits (a plain
    bf16 product keeps 8), and ``mm_exact_mask`` sums as float32 does (a cumulative sum of
    values spanning many magnitudes)."""
    from hybrid_jax.gdn.pallas.tiles import mm, mm_exact_mask, mm_split

    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    want = a @ b
    rel = lambda x: float(np.linalg.norm(np.asarray(x, np.float64) - want) / np.linalg.norm(want))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    assert rel(mm_split(f32(a), f32(b))) < 3e-5
    assert rel(mm(f32(a), f32(b), jnp.bfloat16)) > 1e-3  # what the split is for

    x = rng.standard_normal((64, 64)) * np.logspace(-3, 3, 64)
    mask = np.tril(np.ones((64, 64)), -1).T  # [t, j] = t < j: sums over t < j
    got = np.asarray(mm_exact_mask(f32(x), jnp.asarray(mask > 0)), np.float64)
    np.testing.assert_allclose(got, np.asarray(f32(x), np.float64) @ mask, rtol=0,
                               atol=64 * 6e-8 * np.abs(x).sum(axis=1, keepdims=True).max())


@pytest.mark.parametrize("split", [False, True])
def test_kernel_solve_against_float64_inverse(split):
    """The factor kernels' doubling solve for (I + A)^-1 against NumPy's float64 inverse, on a
    hard A (unit keys, beta up to 2, no decay: every pair interacts), with the
    float32 and the split-bf16 matmuls."""
    from hybrid_jax.gdn.pallas.factor_tiles import iotas, unit_lower_inverse_tile
    from hybrid_jax.gdn.pallas.tiles import mm, mm_split

    rng = np.random.default_rng(7)
    c = 64
    k = rng.standard_normal((c, 16))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    a = np.tril(rng.uniform(0, 2, (c, 1)) * (k @ k.T), -1)
    want = np.linalg.inv(np.eye(c) + a)
    row, col = iotas(c)
    got = unit_lower_inverse_tile(jnp.asarray(a, jnp.float32), row, col, mm_split if split else mm)
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < (1e-4 if split else 1e-5), err


@pytest.mark.parametrize("variant,c,dk,dv", [("gpu", 16, 8, 16), ("tpu", 16, 8, 16),
                                             ("gpu", 64, 96, 160)])
def test_chunk_factors_kernel_matches_xla(variant, c, dk, dv):
    """The fused per-chunk kernel against ``chunk_factors`` (XLA): decays from none (g = 0) to
    very strong, beta up to 2, resets inside chunks (and one at a chunk's first position), at
    a small chunk and the default one (64); head dims wider than the GPU kernels' 64-column
    blocks and not multiples of it."""
    from hybrid_jax.gdn.pallas.chunk_factors import chunk_factors_kernel

    q, k, v, g, beta, seg = _hard_chunks(np.random.default_rng(2), c, dk=dk, dv=dv)
    got = chunk_factors_kernel(KernelInputs(q, k, v, g, beta, seg), scale=0.3,
                               plan=_plan(variant, q.shape[0], dk, dv, c=c))
    want = chunk_factors(q, k, v, g, beta, seg, 0.3)  # seg [.., N, C]: the "head" axis is N
    for a, b_, name in zip(got, want, want._fields):
        assert np.all(np.isfinite(np.asarray(a))), name
        # Absolute error in units of the factor's largest entry (u reaches ~2 here): entries
        # that cancel to near 0 carry the rounding of the terms they came from.
        atol = 1e-6 * max(1.0, float(np.abs(np.asarray(b_)).max()))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=atol,
                                   err_msg=name)


@pytest.mark.parametrize("variant,c,dk,dv", [("gpu", 16, 8, 16), ("tpu", 16, 8, 16),
                                             ("gpu", 64, 96, 160)])
def test_chunk_factors_backward_kernel_matches_autodiff_of_xla(variant, c, dk, dv):
    """The factor kernel's VJP (recomputing gates and solve) against jax.vjp of
    ``chunk_factors`` (XLA) for random cotangents of all six factors: decays from none to very
    strong, beta up to 2, resets inside chunks and at a chunk's first position; head dims in
    several 64-column blocks, the last narrower (96 = 64 + 32 key columns)."""
    from hybrid_jax.gdn.pallas.chunk_factors import chunk_factors_with_inverse
    from hybrid_jax.gdn.pallas.chunk_factors_vjp import chunk_factors_vjp

    rng = np.random.default_rng(5)
    q, k, v, g, beta, seg = _hard_chunks(rng, c, dk=dk, dv=dv)
    (r, n, _, dk), dv = q.shape, v.shape[-1]
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    cot = (x(r, n, c, dv), x(r, n, c, dk), x(r, n, c, dk), x(r, n, c, dk), x(r, n, c, c),
           x(r, n))
    inputs, plan = KernelInputs(q, k, v, g, beta, seg), _plan(variant, r, dk, dv, c=c)
    inverse_t = chunk_factors_with_inverse(inputs, scale=0.3, plan=plan).inverse_t
    got = chunk_factors_vjp(inputs, ChunkFactors(*cot), inverse_t, scale=0.3, plan=plan)
    _, vjp = jax.vjp(lambda *a: chunk_factors(*a, seg, 0.3), q, k, v, g, beta)
    want = vjp(ChunkFactors(*cot))
    for a, b_, name in zip(got, want, ("dq", "dk", "dv", "dg", "dbeta")):
        assert np.all(np.isfinite(np.asarray(a))), name
        scale = float(np.max(np.abs(np.asarray(b_)))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)


@pytest.mark.parametrize("variant,platform,marker", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_for_their_accelerator(variant, platform, marker, dtype):
    """Cross-lowered on this CPU machine, forward and gradient: the GPU variant through jax's
    Triton lowering for CUDA (catching primitives Triton cannot lower, and a fall back to
    Mosaic GPU, whose whole-block copies would not fit shared memory), the TPU variant through
    Pallas' Mosaic TPU lowering (libtpu's own compile is not run here). OLMo Hybrid's head dims
    and a partial chunk."""
    b, t, h, dk, dv = 1, 150, 2, 96, 192
    s = jax.ShapeDtypeStruct
    args = (s((b, t, h, dk), dtype), s((b, t, h, dk), dtype), s((b, t, h, dv), dtype),
            s((b, t, h), jnp.float32), s((b, t, h), jnp.float32), s((b, h, dk, dv), jnp.float32))

    def fwd(q, k, v, g, beta, s0):
        return gdn_pallas(q, k, v, g, beta, dk ** -0.5, s0, None, backend=variant,
                          interpret=False)

    def grads(*args):
        return jax.grad(lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32) ** 2),
                        argnums=range(6))(*args)

    lower = lambda f: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert lower(fwd).count(marker) == 2  # factor kernel, state pass
    # The forward's two, then for the backward: factors, state pass (with states), state pass
    # backwards, the factors' cotangents, the factors' VJP (three kernels).
    assert lower(grads).count(marker) == 9


@pytest.mark.parametrize("dtype,dk,block_v,stages", [
    # (forward, with states, backward), as lowered for CUDA with no GPU here (Hopper's 227 KiB).
    # OLMo's layer in bf16 keeps the stages measured fastest on an H200.
    (jnp.bfloat16, 96, 32, (3, 3, 2)),
    # Dk 256: three stages took 340 KiB and two 232 KiB in the forward, compiled for sm_90a
    # with pip's Triton (experiments/kernel_registers.py): more than the card has.
    (jnp.bfloat16, 256, 32, (1, 2, 1)),
    # float32 factors: twice the bytes per stage (three stages took 248 KiB at Dk 128).
    (jnp.float32, 128, 64, (1, 2, 1)),
])
def test_gpu_state_passes_pipeline_only_as_deep_as_shared_memory_allows(dtype, dk, block_v,
                                                                        stages):
    import re

    from hybrid_jax.gdn.pallas.tiles import gpu_shared_memory_bytes, pipeline_stages

    assert gpu_shared_memory_bytes() == 227 * 1024  # no GPU: the Hopper jax lowers for
    assert pipeline_stages(1, 3) == 3 and pipeline_stages(10 ** 9, 3) == 1
    r, n, c, dv = 2, 4, 64, 128
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    factors = ChunkFactors(s((r, n, c, dv), dtype), *[s((r, n, c, dk), dtype)] * 3,
                           s((r, n, c, c), dtype), s((r, n), f32))
    plan = plan_kernels(batch=r, heads=1, key_dim=dk, value_dim=dv, dtype=dtype, chunk_size=c,
                        token_major=False, block_v=block_v)
    passes = [lambda f, s0: state_pass_gpu(f, s0, plan=plan),
              lambda f, s0: entering_states_gpu(f, s0, plan=plan),
              lambda f, s0: state_pass_backward_gpu(f.u, f, s0, plan=plan)]
    lowered = [re.findall(r"num_stages = (\d+)", jax.jit(f).trace(
        factors, s((r, dk, dv), f32)).lower(lowering_platforms=("cuda",)).as_text())
        for f in passes]
    assert tuple(int(x) for (x,) in lowered) == stages


def test_gdn_pallas_bf16_inputs_stay_close_to_float32():
    """bf16 inputs: matmul operands in bf16 (float32 state, gates and solve; the backward's
    per-chunk states, state cotangents and dv_new stored in bf16, as flash-linear-attention
    stores them), against the float32 chunk form on the same (bf16-rounded) inputs: outputs,
    final state and every gradient within bf16 rounding."""
    from hybrid_jax.gdn import gdn_chunk

    rng = np.random.default_rng(3)
    b, t, h, dk, dv = 1, 100, 2, 32, 64
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = x(b, t, h, dk), x(b, t, h, dk), x(b, t, h, dv)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    g = -jnp.abs(x(b, t, h)) * 0.3
    beta = jnp.asarray(rng.uniform(0, 1, (b, t, h)), jnp.float32)
    s0 = x(b, h, dk, dv) * 0.1
    d_o, d_final = x(b, t, h, dv), x(b, h, dk, dv)
    f32 = lambda a: a.astype(jnp.float32)
    o, final = gdn_pallas(q, k, v, g, beta, dk ** -0.5, s0, None, 32, interpret=True)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    want_o, want_final = gdn_chunk(f32(q), f32(k), f32(v), g, beta, dk ** -0.5, s0, None, 32)
    rel = lambda a, b_: float(jnp.linalg.norm(f32(a) - b_) / jnp.linalg.norm(b_))
    assert rel(o, want_o) < 2e-2 and rel(final, want_final) < 2e-2

    def loss(form, *args):
        o, final = form(*args[:5], dk ** -0.5, args[5], None, 32)
        return jnp.sum(f32(o) * d_o) + jnp.sum(final * d_final)

    pallas = lambda *a: gdn_pallas(*a, interpret=True)
    got = jax.grad(lambda *a: loss(pallas, *a), argnums=range(6))(q, k, v, g, beta, s0)
    want = jax.grad(lambda *a: loss(gdn_chunk, *a), argnums=range(6))(
        f32(q), f32(k), f32(v), g, beta, s0)
    for a, b_, name in zip(got, want, ("dq", "dk", "dv", "dg", "dbeta", "d_initial")):
        assert rel(a, b_) < 1e-2, (name, rel(a, b_))


def test_state_passes_store_per_chunk_arrays_in_the_factors_dtype():
    """bf16 factors: the states, v_new, state cotangents and dv_new the backward reads are
    stored in bf16 (the running states stay float32), equal to the float32 passes' on the same factors
    within bf16 rounding; final state and initial cotangent stay float32."""
    rng = np.random.default_rng(5)
    r, n, c, dk, dv = 2, 6, 16, 16, 32
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
    factors = [f(r, n, c, dv), *(f(r, n, c, dk) for _ in range(3)), f(r, n, c, c)]
    factors = [a.astype(jnp.bfloat16) for a in factors]
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (r, n)), jnp.float32)
    s0, d_out, d_final = f(r, dk, dv), f(r, n, c, dv), f(r, dk, dv)
    for variant in BACKWARD:
        runs = []
        for dt in (jnp.bfloat16, jnp.float32):
            fs = ChunkFactors(*(a.astype(dt) for a in factors), chunk_decay=decay)
            (final, states, v_new), (dv_new, grads, d_s0) = _both_passes(
                variant, fs, s0, d_out.astype(dt), d_final, _plan(variant, r, dk, dv, dt))
            runs.append((states, v_new, grads, dv_new, final, d_s0))
        for a, b_, name in zip(*runs, ("states", "v_new", "grads", "dv_new", "final",
                                       "d_initial")):
            want_dtype = jnp.float32 if name in ("final", "d_initial") else jnp.bfloat16
            assert a.dtype == want_dtype, (variant, name, a.dtype)
            err = float(jnp.linalg.norm(a.astype(jnp.float32) - b_) / jnp.linalg.norm(b_))
            assert err < 1e-2, (variant, name, err)
