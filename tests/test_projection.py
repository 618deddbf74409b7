"""ops.projection: the projections' matmul and its CPU-laid-out VJP against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.ops.projection import projection_dot, projection_dot_general, projection_matmul

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("d_in,d_out", [(24, 40), (40, 24)])  # x or dy transposed on CPU
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_value_and_gradients_match_autodiff_of_a_plain_matmul(dtype, tol, d_in, d_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((37, d_in)), dtype)
    w = jnp.asarray(rng.standard_normal((d_in, d_out)) / 5, dtype)
    cot = jnp.asarray(rng.standard_normal((37, d_out)), jnp.float32)
    plain = lambda x, w: jnp.dot(x, w, precision=HIGHEST)
    ours = lambda x, w: projection_matmul(x, w, HIGHEST)
    if dtype == jnp.float32:
        np.testing.assert_array_equal(ours(x, w), plain(x, w))
    else:  # accumulated in float32, rounded once: within one bf16 step of the exact product
        _assert_within_one_bf16_step(ours(x, w), np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cot))
    want = jax.grad(loss(plain), (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    got = jax.grad(loss(ours), (0, 1))(x, w)
    for name, a, b in zip(("dx", "dkernel"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol * 10,
                                   err_msg=name)


def _assert_within_one_bf16_step(got, exact: np.ndarray) -> None:
    """``got`` (bf16) is ``exact`` (float64) rounded to bf16, or a neighbour of that."""
    assert got.dtype == jnp.bfloat16
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))
    steps = np.abs(np.asarray(got).view(np.int16).astype(np.int32)
                   - rounded.view(np.int16).astype(np.int32))
    assert steps.max() <= 1, steps.max()


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_bf16_products_accumulate_in_float32_and_read_bf16_weights(rows):
    """[rows, in] @ [in, out] in bf16, a single row included (computed as two on the CPU):
    within one bf16 step of the float64 product; on the CPU the compiled product reads the
    bf16 weight where it lies (no float32 copy of it among its temporaries)."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 512)) / 16, jnp.bfloat16)
    got = jax.jit(projection_dot)(x, w)
    assert got.shape == (rows, 512)
    _assert_within_one_bf16_step(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    # The same with the weight as the right operand's rows ([out, in], as a tied head reads it).
    got_t = jax.jit(lambda x, wt: projection_dot(x, wt, ((1,), (1,))))(x, w.T)
    np.testing.assert_array_equal(np.asarray(got_t, np.float32), np.asarray(got, np.float32))
    if jax.default_backend() == "cpu":
        temp = jax.jit(projection_dot).lower(x, w).compile().memory_analysis().temp_size_in_bytes
        assert temp < w.nbytes, temp  # a float32 copy of w would be 2 * w.nbytes


def test_the_cpu_form_is_chosen_when_lowering():
    """A single bf16 row: on the CPU two rows and a float32 result, elsewhere the plain product
    (an AOT compile for a TPU from this host must not get the CPU form)."""
    x = jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    traced = jax.jit(projection_dot).trace(x, w)
    dots = {p: [line for line in traced.lower(lowering_platforms=(p,)).as_text().splitlines()
                if "dot_general" in line] for p in ("cpu", "tpu", "cuda")}
    assert len(dots["cpu"]) == 1 and "(tensor<2x256xbf16>" in dots["cpu"][0]
    assert "-> tensor<2x512xf32>" in dots["cpu"][0]
    for platform in ("tpu", "cuda"):
        assert len(dots[platform]) == 1 and "-> tensor<1x512xbf16>" in dots[platform][0]


def test_the_kernel_cotangent_is_a_plain_product_of_the_transposed_input():
    """On CPU the kernel's cotangent reads x through a transpose that XLA must not fold back
    into the dot (the point of the VJP): the barrier is in the gradient's CPU program, and not
    in the program lowered for a TPU or a GPU (an AOT compile from this host)."""
    x, w = jnp.ones((8, 4)), jnp.ones((4, 6))
    grad = jax.grad(lambda x, w: jnp.sum(projection_matmul(x, w)), argnums=1)
    traced = jax.jit(grad).trace(x, w)
    for platform in ("cpu", "tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == (platform == "cpu"), platform


def test_dot_general_dispatch():
    """Plain 2-D products take projection_matmul; anything else is jax.lax.dot_general."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    np.testing.assert_allclose(projection_dot_general(a, b, dims),
                               jax.lax.dot_general(a, b, dims), rtol=1e-6)
    flat = a.reshape(10, 3)
    np.testing.assert_allclose(projection_dot_general(flat, b, (([1], [0]), ([], []))),
                               jax.lax.dot_general(flat, b, (((1,), (0,)), ((), ()))), rtol=1e-6)
